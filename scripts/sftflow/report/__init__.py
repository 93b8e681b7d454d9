"""The assets of `snakemake --report`: PNG plots and HTML tables made from a run's stats, metrics and eval results.

One module per stage of the data flow, each with pure functions from parsed inputs to pandas frames
(`*_frame`) and writers that put a plot or an HTML page at a path, atomically:

- `inputs`     reading sft.stats.json, packed/stats.json, contamination.jsonl, metrics.jsonl, job*.done,
               eval.json; a missing or malformed file is a `SftflowError` naming it
- `render`     the Agg figure factory, PNG and HTML-page writers, number formatting for tables
- `data_prep`  the data-preparation funnel (plot + table), the decontamination matches, the packing fill
- `training`   loss / learning-rate / grad-norm curves, tokens/s curve, per-run throughput summary
- `eval_table` eval.json as one table (model x benchmark rows, one column per metric)
- `cli`        `make_report()`, the report_assets rule's script and the command line
"""
