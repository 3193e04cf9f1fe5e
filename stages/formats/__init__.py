"""Files and bytes: atomic writes and safetensors with pgolf metadata, token shards, codecs, the blob,
dequantization, the challenge's int8 artifact, and what a submission is (data identity, code bytes)."""
