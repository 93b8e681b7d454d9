# Path helpers and input functions shared by every rule file.
import re


OUT = Path(config["output_dir"])
DEMO = config["demo"]["enabled"]


wildcard_constraints:
    job=r"\d+",
    seed=r"\d+",
    benchmark=r"[A-Za-z0-9_\-]+",


def out(*parts):
    """A path under the configured output directory."""
    return str(OUT.joinpath(*parts))


def not_implemented(stage, issue):
    """Shell command for a stage a later issue implements: fail with a clear message, never a fake output."""
    return (
        f"echo 'sftflow: the {stage} stage is not implemented yet (tracked in issue {issue}); "
        f"run the stages before it, e.g. snakemake --cores 2 {out('final_hf_model')}' >&2; exit 1"
    )


def all_targets():
    """Default targets - the eval summary, plus the conversion_step export when that key is set."""
    targets = [out("eval.json")]
    step = config["training"]["conversion_step"]
    if step is not None:
        targets.append(out("hf_models", f"step_{step}"))
    return targets


def get_generations():
    """The generation files data preparation reads: the demo's, or the user's globs (expanded now)."""
    patterns = config["prepare_data"]["input_files"]
    if patterns is None:
        return [out("demo", "generations", f"output-rs{i}.jsonl") for i in range(config["demo"]["num_seeds"])]
    from sftflow.prepare.pipeline import expand_input_files

    return [str(p) for p in expand_input_files(patterns)]


def get_base_model():
    """Local directory (a DAG input) or hub name of the model to fine-tune."""
    return config["model"]["base_model"] or out("demo", "base_model")


def get_tokenizer():
    return config["model"]["tokenizer"] or get_base_model()


def local_inputs(*paths):
    """Only the paths that are files/dirs we make or that exist locally (hub names are not DAG inputs)."""
    made_here = out("demo")
    return [p for p in paths if p.startswith(made_here) or Path(p).exists()]


def benchmark_names():
    """Benchmark names from eval.benchmarks ("gsm8k:4,math" -> ["gsm8k", "math"])."""
    names = []
    for item in config["eval"]["benchmarks"].split(","):
        item = item.strip()
        if item:
            names.append(item.split(":")[0])
    return names


def get_benchmark_file(name):
    return out("benchmarks", name, "test.jsonl")


def get_contamination():
    """The contamination file remove_contaminated reads: the user's, or the one the decontaminate rule makes."""
    prep = config["prepare_data"]
    if not prep["filters"]["remove_contaminated"]:
        return []
    return prep["contamination_file"] or out("data", "contamination.jsonl")
