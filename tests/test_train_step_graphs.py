"""The training step under CUDA graphs (train.compile_mode: reduce-overhead): gradient accumulation must not
accumulate into a buffer the backward graph owns. The graphs themselves need a GPU (bench/step_profile.sh);
on CPU this checks what the trainer does about them: after the first micro-batch the gradients are copies, and
the step's result is the plain step's."""

from __future__ import annotations

from dataclasses import replace

import torch

from test_distill_reptile import TRAIN, make_trainer

from pgolf.formats.shards import DistributedTokenLoader


def one_step(data, out, graphs: bool) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The weights after one step (accumulating 2 micro-batches), and each parameter's .grad address as each
    micro-batch's gradient lands in it."""
    trainer = make_trainer(data, out, replace(TRAIN, grad_accum_steps=2))
    trainer.cuda_graphs = graphs  # on CPU nothing is compiled; the trainer's handling of the gradients runs
    landed = {name: [] for name, _ in trainer.model.named_parameters()}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, at=landed[name]: at.append(p.grad.data_ptr()))
             for name, p in trainer.model.named_parameters()]
    trainer.train_step(DistributedTokenLoader(data, 0, 1, torch.device("cpu")))
    for h in hooks:
        h.remove()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, landed


def test_under_cuda_graphs_the_first_gradients_are_copied_before_the_second_backward(tokenized_dir, tmp_path):
    plain, plain_at = one_step(tokenized_dir, tmp_path / "plain", graphs=False)
    graphs, graphs_at = one_step(tokenized_dir, tmp_path / "graphs", graphs=True)
    # plain: the second backward adds into the tensor the first one left (under graphs, a buffer it owns);
    # graphs: into a copy of it
    assert all(len(at) == 2 and at[0] == at[1] for at in plain_at.values())
    assert all(len(at) == 2 and at[0] != at[1] for at in graphs_at.values())
    for name, w in plain.items():
        torch.testing.assert_close(graphs[name], w, rtol=0, atol=0, msg=name)


def test_the_trainer_takes_care_of_cuda_graphs_in_every_mode_that_replays_them():
    """The gradient copy above is needed in each compile mode whose Inductor options turn CUDA graphs on:
    the trainer's table of such modes agrees with torch's own, for every mode train.compile_mode offers."""
    from dataclasses import fields

    import torch._inductor

    from pgolf.config.sections import TrainConfig
    from pgolf.nn.trainer import CUDA_GRAPH_MODES

    modes = next(f for f in fields(TrainConfig) if f.name == "compile_mode").metadata["rule"]["choices"]
    assert "max-autotune" in modes
    for mode in modes:
        replays = torch._inductor.list_mode_options(None if mode == "default" else mode).get("triton.cudagraphs", False)
        assert (mode in CUDA_GRAPH_MODES) == replays, mode
