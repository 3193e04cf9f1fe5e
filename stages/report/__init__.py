"""What a run shows a person: progress while it works, the metrics row DVC tabulates (with a report of
the rest beside it), and charts. A room of its own because every stage uses it and none of it changes a
result; only `progress` and `metrics` are on the decode path (ttt-eval shows and writes them too)."""
