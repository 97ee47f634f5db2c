"""`embed-files`: embed a corpus on disk into a resumable Parquet dataset (the [cli] extra).

Modules, one job each:
- main: the command line, the wiring and the exit status;
- settings: the embedding options, resolved against the served model;
- connection: the channel (TLS, API key) and GetModelInfo;
- sources: walking the inputs and reading each format into documents, and the pre-scan;
- markup: Word and HTML files as text with Markdown headings;
- shards: which worker of `--shard I/N` (or an Indexed Job) owns which document;
- schema: the output columns and the row buffer that turns results into them;
- output: the dataset directory (committed parts, resume), the errors file, the writer thread;
- stream: the flow-controlled EmbedStream runners (one per --streams) that reconnect and
  resend;
- progress: the bar, the periodic log lines and the summary.
"""
