"""pgolf: Parameter Golf as a pipeline of seven stages (tokenize, train, calibrate, quantize, pack,
ttt-eval, verify) passing files to each other.

The stage modules at this level are thin doors: read inputs, call building blocks, write outputs.
The building blocks live in rooms named for what they hold: `config` (typed params, presets, the one
resolver), `nn` (model, optimizer, training), `quant` (weights to integer codes), `formats` (every file
and byte format, and the decode path of a blob), `text` (corpus, tokenizer, byte accounting, the scoring
ledger), `ttt` (test-time training), `report` (progress, metrics rows, charts) and `audit` (verify's
checks). stages/README.md draws the map.
"""
