"""Text and its accounting: documents, the tokenizer, CaseOps, the tokenized data set, byte counts and
bits-per-byte scoring."""
