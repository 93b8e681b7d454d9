"""The assets of `snakemake --report`: PNG plots and HTML tables made from a run's stats, metrics and eval results.

One module per stage of the data flow, each with pure functions from parsed inputs to pandas frames
(`*_frame`) and writers that put a plot or an HTML page at a path, atomically:

- `inputs`     reading sft.stats.json, packed/stats.json, contamination.jsonl, metrics.jsonl, job*.done,
               eval.json; a missing or malformed file is a `SftflowError` naming it
- `pages`      the page files and the rule that writes each (read by the Snakefile)
- `render`     HTML-page writer and number formatting for tables (no matplotlib: the eval summary uses it)
- `figures`    the Agg figure factory and PNG writer
- `data_prep`  the data-preparation funnel (plot + table), the decontamination matches, pack_data's sequences
               and its over-long and dropped ones
- `training`   loss / learning-rate / grad-norm curves, tokens/s curve, per-run throughput summary, the packing
               the trainer did per step
- `eval_table` eval.json as one table (model x benchmark rows, one column per metric)
- `cli`        each report rule's page writers, `make_report()` (all pages) and the command line
"""
