"""Test-time training: modes that adapt the model on validation text it has already scored, each through
the one scoring path (pgolf.text.ledger), so that no update ever sees a target before it is recorded."""
