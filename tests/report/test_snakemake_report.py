"""`snakemake --report report.html` after a real (small) workflow run, opened in headless Chromium.

Snakemake 9 embeds each report() output as a base64 data URI in the page's `results` object and shows it
when its eye button is clicked: a PNG in an <img>, an HTML file in an <iframe>, anything else as a download
link. The test clicks every entry the way a reader would and checks what the browser then shows: the
decoded image's size, the iframe's tables (numbers compared with the run's own files), the download's bytes.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from sftflow.report.render import format_value
from tests.conftest import SMALL_RUN_CONFIG, read_jsonl, snakemake
from tests.report.chromium import CHROMIUM, Chromium
from tests.report.conftest import png_size

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (Debian package: apt-get install chromium)"
    ),
]

# (category, label in the menu, file, what the eye button shows)
ENTRIES = [
    ("1. Data", "filter funnel (plot)", "data_funnel.png", "img"),
    ("1. Data", "filter funnel (table)", "data_prep.html", "iframe"),
    ("1. Data", "decontamination matches", "contamination.html", "iframe"),
    ("1. Data", "tokenized sequences, over-long ones", "packing.html", "iframe"),
    ("2. Training", "loss, learning rate, grad norm", "training_curves.png", "img"),
    ("2. Training", "throughput (tokens/s)", "throughput.png", "img"),
    ("2. Training", "summary by run, packing per step", "training_summary.html", "iframe"),
    ("3. Evaluation", "benchmark results", "eval.html", "iframe"),
    ("4. Config", "resolved config", "config.html", "iframe"),
    ("4. Config", "resolved config (YAML file for --configfile)", "config.yaml", "download"),
]

# Opens a category from the results menu, clicks the eye button of the row labelled `label`, and says
# what the content pane then shows.
SHOW_ENTRY = """
(async (category, label) => {
  const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
  app.setView({navbarMode: "menu"});
  await sleep(100);
  app.showCategory(category);
  // The menu renders asynchronously: wait for the row (up to 20 s, however slow the machine), not a fixed time.
  const findRow = () => [...document.querySelectorAll("tr")].find(tr => tr.cells.length && tr.cells[0].innerText.trim() === label);
  let row = findRow();
  for (let i = 0; !row && i < 200; i++) {
    await sleep(100);
    row = findRow();
  }
  if (!row) return {kind: "missing", menu: document.body.innerText.slice(0, 2000)};
  const button = row.querySelector("a");
  if (button.hasAttribute("download")) {
    return {kind: "download", name: button.getAttribute("download"), href: button.href};
  }
  button.click();
  for (let i = 0; i < 200; i++) {
    await sleep(100);
    const img = document.querySelector("img[src^='data:image/png']");
    if (img) {
      await img.decode();
      return {kind: "img", width: img.naturalWidth, height: img.naturalHeight, src: img.src};
    }
    const frame = document.querySelector("iframe[src^='data:text/html']");
    if (frame) return {kind: "iframe", src: frame.src};
  }
  return {kind: "nothing shown"};
})
"""

# What a reader sees in the iframe: its title and every table as rows of cell texts.
FRAME_CONTENT = """
(async () => {
  while (document.readyState !== "complete") await new Promise(resolve => setTimeout(resolve, 50));
  return {
    title: document.querySelector("h1").innerText,
    text: document.body.innerText,
    tables: [...document.querySelectorAll("table")].map(t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()))),
  };
})()
"""


def data_uri_bytes(uri: str) -> bytes:
    header, payload = uri.split(",", 1)
    assert header.endswith(";base64"), header
    return base64.b64decode(payload)


def single_spaced(text: str) -> str:
    """Runs of spaces show as non-breaking spaces in the page; compare texts with single ordinary ones."""
    return " ".join(text.split())


def rows_as_dicts(table: list[list[str]]) -> list[dict[str, str]]:
    return [dict(zip(table[0], row)) for row in table[1:]]


@pytest.fixture(scope="module")
def finished_run(small_demo_run, tmp_path_factory) -> Path:
    """A finished run of the small demo (two chained jobs, both models evaluated through `transformers serve`)
    that has made report.html, as a user does: `snakemake results/eval.json`, then `snakemake --report
    report.html` (no target: the default one). The report is made in a copy of the shared run."""
    workdir = tmp_path_factory.mktemp("report_run") / "run"
    shutil.copytree(small_demo_run, workdir)  # modification times kept: Snakemake sees the run as finished
    result = snakemake("--cores", "1", *SMALL_RUN_CONFIG, "--report", "report.html", cwd=workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return workdir


@pytest.fixture(scope="module")
def shown(finished_run, tmp_path_factory) -> dict:
    """What Chromium shows for the report's start page and for each entry's eye button."""
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    with Chromium(profile) as browser:
        page = browser.page()
        page.open((finished_run / "report.html").as_uri())
        start = page.evaluate(
            "(async () => { while (typeof app === 'undefined') await new Promise(r => setTimeout(r, 50));"
            " await new Promise(r => setTimeout(r, 300)); return document.body.innerText; })()"
        )
        entries = {}
        for category, label, name, _ in ENTRIES:
            view = page.evaluate(f"{SHOW_ENTRY}({json.dumps(category)}, {json.dumps(label)})")
            if view["kind"] == "iframe":
                (frame,) = [f for f in page.frames() if f["url"].startswith("data:text/html")]
                view["content"] = page.evaluate_in_frame(frame["id"], FRAME_CONTENT)
            entries[name] = view
    return {"start": start, "entries": entries}


def test_start_page_shows_the_workflow_description_and_the_result_categories(shown):
    start = shown["start"]
    assert "sftflow: generated math solutions" in start
    assert "in 2 chained training job(s) (backend fsdp)" in start  # rendered from the run's config
    for category in ("1. Data", "2. Training", "3. Evaluation", "4. Config"):
        assert category in start


@pytest.mark.parametrize("category, label, name, kind", ENTRIES, ids=[e[2] for e in ENTRIES])
def test_each_entry_shows_its_file(shown, finished_run, category, label, name, kind):
    view = shown["entries"][name]
    assert view["kind"] == kind, view
    asset = finished_run / "results" / "report" / name
    if kind == "img":
        assert (view["width"], view["height"]) == png_size(asset)  # the browser decoded the whole PNG
        assert data_uri_bytes(view["src"]) == asset.read_bytes()
    elif kind == "iframe":
        assert data_uri_bytes(view["src"]) == asset.read_bytes()
        assert view["content"]["title"]
    else:
        assert view["name"] == name and data_uri_bytes(view["href"]) == asset.read_bytes()


def frame(shown, name) -> dict:
    return shown["entries"][name]["content"]


def test_funnel_table_matches_the_runs_stats(shown, finished_run):
    stats = json.loads((finished_run / "results" / "data" / "sft.stats.json").read_text())
    funnel = rows_as_dicts(frame(shown, "data_prep.html")["tables"][0])
    assert funnel[0]["stage"] == "read" and funnel[0]["rows out"] == format_value(stats["rows_read"])
    assert funnel[-1]["stage"] == "written" and funnel[-1]["rows out"] == format_value(stats["rows_written"])
    for stage in stats["funnel"]:
        (row,) = [r for r in funnel if r["stage"] == stage["stage"]]
        assert row["dropped"] == format_value(stage["dropped"])


def test_decontamination_table_lists_every_match_of_the_contamination_file(shown, finished_run):
    contaminated = [
        r for r in read_jsonl(finished_run / "results" / "data" / "contamination.jsonl") if r["contaminated"]
    ]
    assert contaminated  # the demo plants benchmark problems in its training data
    page = frame(shown, "contamination.html")
    rows = rows_as_dicts(page["tables"][0])
    assert sorted(single_spaced(r["training problem"]) for r in rows) == sorted(
        single_spaced(r["problem"]) for r in contaminated
    )
    assert f"matched {len(contaminated)} training problems" in page["text"]


def test_packing_training_eval_and_config_pages_hold_the_runs_numbers(shown, finished_run):
    packing = json.loads((finished_run / "results" / "data" / "packed" / "stats.json").read_text())
    sequences, overlong = (dict(table[1:]) for table in frame(shown, "packing.html")["tables"])
    assert sequences["sequences kept"] == format_value(packing["sequences_kept"])
    assert sequences["total tokens"] == format_value(packing["total_tokens"])
    count = "over-long sequences (more tokens than max_total_sequence_length)"
    assert overlong[count] == format_value(packing["overlong"]["count"])
    assert overlong["over-long action"] == packing["overlong"]["action"]

    metrics_file = finished_run / "results" / "checkpoints" / "metrics" / "metrics.jsonl"
    steps = list({r["step"]: r for r in read_jsonl(metrics_file) if "loss" in r}.values())  # a step's last row counts
    assert all("sequences" in r for r in steps), "the trainer logs each step's packing in metrics.jsonl"
    trained = dict(frame(shown, "training_summary.html")["tables"][1][1:])
    assert trained["steps"] == format_value(len(steps))
    assert trained["sequences trained"] == format_value(sum(r["sequences"] for r in steps))
    assert trained["tokens trained"] == format_value(sum(r["tokens"] for r in steps))

    runs = rows_as_dicts(frame(shown, "training_summary.html")["tables"][0])
    assert [(r["run"], r["job"], r["step range"]) for r in runs] == [
        ("0", "0", "1–6"),
        ("1", "1", "7–12"),
        ("all", "—", "1–12"),
    ]
    assert "Learning-rate schedule changes None: every step ran on one learning-rate schedule" in single_spaced(
        frame(shown, "training_summary.html")["text"]
    )

    summary = json.loads((finished_run / "results" / "eval.json").read_text())
    shown_rows = rows_as_dicts(frame(shown, "eval.html")["tables"][0])
    assert sorted((r["model"], r["benchmark"]) for r in shown_rows) == [("base", "demo"), ("final", "demo")]
    for row in shown_rows:
        metrics = summary["results"][row["model"]][row["benchmark"]]
        pass1 = format_value(metrics["pass@1"])
        assert row["pass@1"].split(" ± ")[0] == pass1
        assert row["num_entries"] == "6" and row["no_answer"] == format_value(metrics["no_answer"])

    config = frame(shown, "config.html")["text"]
    assert "max_num_steps: 12" in config and "num_train_problems: 300" in config
    # Each value's source (issue 12): the test's file, the demo's config, or the schema.
    assert "max_num_steps: 12 # small.yaml" in single_spaced(config), config[-3000:]
    assert "learning_rate: 0.002 # config/config.yaml" in single_spaced(config)
    assert "weight_decay: 0.01 # schema default" in single_spaced(config)
