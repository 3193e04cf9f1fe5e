"""The model and how it is trained: GPT, parameter naming, Muon, optimizer groups, the schedule, the
training loop, its saved state, and the torchrun protocol."""
