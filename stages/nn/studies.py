"""Layers of the seed studies (PR #375 and PR #1227 of the challenge), each behind a ModelConfig key, off by default.

- Memory tokens (PR #375: 64), `memory_tokens`: N learned embeddings before every window. The blocks run on
  [memory; tokens]; attention lets every token read all memory tokens plus its own document's causal past
  (pgolf.nn.attention's masks with `prefix`), memory tokens read only memory tokens (causally), and the
  memory positions are cut off before the final norm, so the logits stay [B, T, V]. Tokens take RoPE
  positions N..N+T−1 (shifted by N: relative offsets between tokens are unchanged). An S4D layer starts
  every document from the state the memory leaves (see below), so the memory reaches every document there too.
- DenseFormer (PR #1227; Pagliardini et al. 2024, "DenseFormer: Enhancing Information Flow in Transformers via
  Depth Weighted Averaging"), `denseformer`: after block run i the stream becomes Σ_j α_ij X_j over the
  embedding output X_0 and the block outputs X_1..X_i+1 so far; α starts at the identity (α_i,i+1 = 1), so
  the model starts as without it. U-Net skips are pushed and merged on the averaged stream as without it;
  depth recurrence and parallel lanes are refused by ModelConfig.check.
- S4D-Lin (PR #1227: the bottom two layers; Gu et al. 2022, "On the Parameterization and Initialization of
  Diagonal State Space Models"), `s4d_layers`/`s4d_state`: the attention sublayer of the bottom N physical
  layers is a diagonal SSM per channel, h_t = Ā h_t−1 + B̄ u_t, y_t = 2·Re(C h_t) + D u_t (zero-order hold,
  Ā = exp(ΔA), B̄ = (Ā − 1)/A · B; S4D-Lin init A_n = −1/2 + iπn, log Δ uniform in [log 1e-3, log 1e-1],
  B = 1, C complex normal, D normal), then GELU and a zero-initialised output projection (the paper's layer
  with a linear output in place of its GLU). With doc_mask the state is reset at every BOS. Computed in
  chunks: within a chunk from the kernel Σ_n C_n Ā_n^k B̄_n masked to the document, across chunks through the
  carried state, so memory is O(T · chunk · dim), never O(T² · dim).
- Monarch MLP (PR #1227; Dao et al. 2022, "Monarch: Expressive Structured Matrices for Efficient and Accurate
  Training"), `monarch_blocks`: each MLP matrix is L · P · R, R and L block-diagonal with K blocks, P the
  transpose permutation of a [K, m] grid. (The paper's M = P L Pᵀ R also permutes the outputs; a fixed
  relabelling of outputs is absorbed by the next layer, so it is left out.) The factors are 3-D tensors
  [K, rows, cols]: Muon orthogonalises each block (the polar factor of a block-diagonal matrix is that of each
  block), so they stay in the matrix group.

An option that is off creates no parameter and draws no random number. Everything here runs inside
`GPT.hidden`, the one forward every path shares (training, evaluation, calibration, TTT), with no
data-dependent Python control flow, so it traces under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.config.sections import ModelConfig
from pgolf.nn.layers import CastedLinear

MEMORY_INIT_STD = 0.005  # the tied embedding's init std: both are normed, so Adam moves them alike
S4D_CHUNK = 32  # positions per chunk of the S4D scan: within-chunk memory grows with it, the sequential steps shrink
S4D_DT_MIN, S4D_DT_MAX = 1e-3, 1e-1  # S4D's range of the initial step size Δ (log-uniform)


# ---- memory tokens


def prepend_memory(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """[memory; x] for every row: x [B, T, D] (the normed embedding), memory [N, D], normed like it."""
    mem = F.rms_norm(memory, (memory.size(-1),)).to(x.dtype)
    return torch.cat([mem.expand(x.size(0), -1, -1), x], dim=1)


def memory_taps(taps: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Canon's taps over [memory; tokens]: tap i of memory position p reads memory position p − i when it
    exists; a token's taps are unchanged (they never reach back before the window, so never into memory)."""
    pos = torch.arange(n, device=taps[0].device)
    return [torch.cat([(pos >= i).to(tap.dtype)[None, :, None].expand(tap.size(0), -1, -1), tap], dim=1)
            for i, tap in enumerate(taps)]


# ---- DenseFormer


class DenseFormer(nn.Module):
    """Depth-weighted averages: `dwa_weights[i]` holds α_i,0..i+1 for block run i (the embedding output, then
    each block output so far), one-hot on the newest output at init."""

    def __init__(self, num_blocks: int):
        super().__init__()
        self.dwa_weights = nn.ParameterList(nn.Parameter(self.start(i + 2)) for i in range(num_blocks))

    @staticmethod
    def start(n: int) -> torch.Tensor:
        """The initial weights of an average over n streams: all on the newest, so the model starts as without it."""
        return F.one_hot(torch.tensor(n - 1), n).float()

    def forward(self, history: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Append block output x to `history` ([X_0, X_1, ...]) and return the averaged stream."""
        history.append(x)
        w = self.dwa_weights[len(history) - 2].to(x.dtype)
        out = w[0] * history[0]
        for j in range(1, len(history)):
            out = out + w[j] * history[j]
        return out

    def describe(self) -> dict:
        """The learned averages and how far they moved from the one-hot start: PR #1227 found its weights still
        at init, which the train metrics let a run check."""
        weights = [w.detach().float().cpu() for w in self.dwa_weights]
        shift = max(float((w - self.start(len(w))).abs().max()) for w in weights)
        return {"largest_shift_from_init": round(shift, 6),
                "weights": [[round(float(a), 4) for a in w] for w in weights]}


# ---- S4D


class SSMInput:
    """What an S4D layer reads where an attention layer reads its mask: `starts` [B, T] (True at a BOS with
    doc_mask, else None: one segment) and `prefix`, the number of memory positions before the tokens."""

    def __init__(self, starts: torch.Tensor | None, prefix: int = 0):
        self.starts, self.prefix = starts, prefix


def _cmul(a_re, a_im, b_re, b_im):
    return a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re


def _powers(dta_re: torch.Tensor, dta_im: torch.Tensor, k: torch.Tensor):
    """Ā^k = exp(k·ΔA) for every exponent in k: (re, im) [H, N, len(k)]; |Ā| < 1, so nothing grows."""
    mag = torch.exp(dta_re[..., None] * k)
    ang = dta_im[..., None] * k
    return mag * torch.cos(ang), mag * torch.sin(ang)


def _stack(pairs: list[tuple[torch.Tensor, torch.Tensor]], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of (re, im) pairs stacked into one (re, im) pair along `dim`."""
    return torch.stack([re for re, _ in pairs], dim), torch.stack([im for _, im in pairs], dim)


def _toeplitz(kernel: torch.Tensor) -> torch.Tensor:
    """[..., L] kernel → [..., L, L] lower-triangular T[i, j] = kernel[i − j] (j <= i), else 0."""
    L = kernel.size(-1)
    pos = torch.arange(L, device=kernel.device)
    lag = pos[:, None] - pos[None, :]
    return kernel[..., lag.clamp(min=0)] * (lag >= 0).to(kernel.dtype)


def s4d_scan(u: torch.Tensor, dta: tuple[torch.Tensor, torch.Tensor], db: tuple[torch.Tensor, torch.Tensor],
             c: tuple[torch.Tensor, torch.Tensor], starts: torch.Tensor | None = None,
             reset: tuple[torch.Tensor, torch.Tensor] | None = None, chunk: int = S4D_CHUNK
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """y_t = 2·Re Σ_n C_n h_t,n for h_t = Ā h_t−1 + B̄ u_t, h_−1 = 0, over u [B, T, H] (float32), with the
    complex (re, im) ΔA, B̄ and C [H, N]. At a position where `starts` [B, T] is True, h_t−1 is replaced by
    `reset` ([B, H, N] re/im, e.g. the state memory tokens leave; zero when None), and so is h_−1 when `reset`
    is given. Returns y [B, T, H] and the state after the last position.

    T is cut into chunks of `chunk` (zero-padded in front, which leaves a zero state zero): within a chunk,
    y = Toeplitz(K) u with K[k] = 2·Re Σ_n C_n Ā_n^k B̄_n, masked to pairs with no start between them; the
    state at each chunk's end is carried to the next by a scan over the chunks in two levels (`_linear_scan`)."""
    B, T, H = u.shape
    if reset is not None:  # the first position starts from `reset` too
        first = torch.zeros(B, T, dtype=torch.bool, device=u.device)
        first[:, 0] = True
        starts = first if starts is None else starts | first
    L = chunk
    pad = (-T) % L
    if pad:
        u = F.pad(u, (0, 0, pad, 0))
        starts = None if starts is None else F.pad(starts, (pad, 0), value=False)
    nc = (T + pad) // L
    uc = u.view(B, nc, L, H)
    (dta_re, dta_im), (db_re, db_im), (c_re, c_im) = dta, db, c
    k = torch.arange(L + 1, device=u.device, dtype=u.dtype)
    pw_re, pw_im = _powers(dta_re, dta_im, k)  # Ā^0 .. Ā^L, [H, N, L + 1]
    cb_re, cb_im = _cmul(c_re, c_im, db_re, db_im)
    kernel = 2 * (torch.einsum("hn,hnk->hk", cb_re, pw_re[..., :L]) - torch.einsum("hn,hnk->hk", cb_im, pw_im[..., :L]))
    toeplitz = _toeplitz(kernel)  # [H, L, L]

    if starts is None:
        y = torch.einsum("hij,bcjh->bcih", toeplitz, uc)
        ok_end = None
    else:
        st = starts.view(B, nc, L)
        count = torch.cumsum(st.to(torch.int32), dim=-1)  # starts up to each position of its chunk
        same = (count[..., :, None] == count[..., None, :]).to(u.dtype)  # no start in (j, i]
        ok_end = (count == count[..., -1:]).to(u.dtype)  # no start after j in the chunk: j reaches the chunk's end
        first_ok = (count == 0).to(u.dtype)  # no start up to i: the carried state reaches i
        passes = (count[..., -1] == 0).to(u.dtype)  # no start in the chunk: the carried state crosses it
        y = torch.einsum("hij,bcij,bcjh->bcih", toeplitz, same, uc)

    # each chunk's own contribution to the state at its end: Σ_j Ā^(L−1−j) B̄ u_j (from the last start on)
    q_re, q_im = _cmul(db_re[..., None], db_im[..., None], pw_re[..., :L].flip(-1), pw_im[..., :L].flip(-1))
    v = uc if ok_end is None else uc * ok_end[..., None]
    loc_re = torch.einsum("hnj,bcjh->bchn", q_re, v)
    loc_im = torch.einsum("hnj,bcjh->bchn", q_im, v)
    # the carried state's contribution at position i: 2·Re Σ_n C_n Ā_n^(i+1) S_n
    z_re, z_im = _cmul(c_re[..., None], c_im[..., None], pw_re[..., 1:], pw_im[..., 1:])  # [H, N, L]
    if reset is not None:
        r_re, r_im = reset
        # a start at j replaces the state before it by R: the state at the chunk's end gains Ā^(L−j) R ...
        m = st * ok_end
        e_re = torch.einsum("bcj,hnj->bchn", m, pw_re[..., 1:].flip(-1))
        e_im = torch.einsum("bcj,hnj->bchn", m, pw_im[..., 1:].flip(-1))
        inj_re, inj_im = _cmul(e_re, e_im, r_re[:, None], r_im[:, None])
        loc_re, loc_im = loc_re + inj_re, loc_im + inj_im
        # ... and position i >= j of its segment gains 2·Re Σ_n C_n Ā_n^(i−j+1) R_n
        kr = 2 * (torch.einsum("hnk,bhn->bhk", z_re, r_re) - torch.einsum("hnk,bhn->bhk", z_im, r_im))
        y = y + torch.einsum("bhij,bcij->bcih", _toeplitz(kr), same * st[:, :, None, :])

    # the state at each chunk's end, S_i = g_i·Ā^L·S_i−1 + loc_i (g_i = 0 where a start cuts the chain)
    decay = pw_re[..., L].expand(1, nc, -1, -1), pw_im[..., L].expand(1, nc, -1, -1)
    if starts is not None:
        decay = decay[0] * passes[..., None, None], decay[1] * passes[..., None, None]
    end_re, end_im = _linear_scan(decay, (loc_re, loc_im))
    # the state entering chunk i is the one chunk i − 1 left (zero before the first)
    prev_re, prev_im = F.pad(end_re[:, :-1], (0, 0, 0, 0, 1, 0)), F.pad(end_im[:, :-1], (0, 0, 0, 0, 1, 0))
    carry = 2 * (torch.einsum("hni,bchn->bcih", z_re, prev_re) - torch.einsum("hni,bchn->bcih", z_im, prev_im))
    y = y + (carry if starts is None else carry * first_ok[..., None])
    return y.reshape(B, nc * L, H)[:, pad:], (end_re[:, -1], end_im[:, -1])


def _linear_scan(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every S_i of S_i = a_i·S_i−1 + b_i over dim 1 from S_−1 = 0: complex (re, im) pairs, b [B, n, ...] and a
    broadcastable to it.

    In two levels of about √n sequential steps each, where a plain loop over the n positions would unroll into n
    steps in the compiled graph (compile time grows with them): the positions are cut into groups of g; each
    group runs from a zero state, all groups at once, keeping the running product of its a; then the state
    entering each group is carried across the groups, and added to each position scaled by that product."""
    (a_re, a_im), (b_re, b_im) = a, b
    n = b_re.size(1)
    g = math.isqrt(n - 1) + 1  # ⌈√n⌉
    groups = -(-n // g)
    tail = (0, 0) * (b_re.dim() - 2) + (0, groups * g - n)  # pad dim 1 at the end: b = 0, a = 1 after the last
    a_re, a_im = F.pad(a_re, tail, value=1.0), F.pad(a_im, tail)
    b_re, b_im = F.pad(b_re, tail), F.pad(b_im, tail)
    a_re, a_im, b_re, b_im = (t.unflatten(1, (groups, g)) for t in (a_re, a_im, b_re, b_im))
    # within each group, from a zero state: the local state and the product of a up to each position
    s, p = [(b_re[:, :, 0], b_im[:, :, 0])], [(a_re[:, :, 0], a_im[:, :, 0])]
    for k in range(1, g):
        ak = a_re[:, :, k], a_im[:, :, k]
        t_re, t_im = _cmul(*ak, *s[-1])
        s.append((t_re + b_re[:, :, k], t_im + b_im[:, :, k]))
        p.append(_cmul(*ak, *p[-1]))
    (s_re, s_im), (p_re, p_im) = _stack(s, 2), _stack(p, 2)
    # the state entering each group: the one the previous group left
    enter = [(torch.zeros_like(s_re[:, 0, 0]), torch.zeros_like(s_im[:, 0, 0]))]
    for j in range(groups - 1):
        t_re, t_im = _cmul(p_re[:, j, -1], p_im[:, j, -1], *enter[-1])
        enter.append((t_re + s_re[:, j, -1], t_im + s_im[:, j, -1]))
    e_re, e_im = _stack(enter, 1)
    t_re, t_im = _cmul(p_re, p_im, e_re[:, :, None], e_im[:, :, None])
    return (s_re + t_re).flatten(1, 2)[:, :n], (s_im + t_im).flatten(1, 2)[:, :n]


class S4DMixer(nn.Module):
    """An S4D-Lin layer in the attention slot of a block: out = proj(GELU(SSM(n) + D ⊙ n)) on the normed block
    input n, each of the model_dim channels its own SSM of s4d_state/2 complex modes. The SSM's parameters are
    fp32 control tensors (`s4d_` names: Adam, kept in float); `proj` is a block matrix, zero at init."""

    adapter = None  # the attention slot's test-time LoRA from its input to its output (pgolf.ttt.lora's "o")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, modes = cfg.model_dim, cfg.s4d_state // 2
        lo, hi = math.log(S4D_DT_MIN), math.log(S4D_DT_MAX)
        self.s4d_log_dt = nn.Parameter(torch.rand(H) * (hi - lo) + lo)
        self.s4d_A_log = nn.Parameter(torch.full((H, modes), math.log(0.5)))  # Re A = −exp(·) = −1/2, kept < 0
        self.s4d_A_im = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(H, 1))  # Im A = πn
        self.s4d_B = nn.Parameter(torch.stack((torch.ones(H, modes), torch.zeros(H, modes)), dim=-1))  # (re, im)
        self.s4d_C = nn.Parameter(torch.randn(H, modes, 2) * math.sqrt(0.5))  # complex normal, E|C|² = 1
        self.s4d_D = nn.Parameter(torch.randn(H))
        self.proj = CastedLinear(H, H, bias=False)
        self.proj.zero_init = True

    def coefficients(self):
        """(ΔA, B̄, C) as (re, im) pairs [H, N], float32, with B̄ = (exp(ΔA) − 1)/A · B (zero-order hold)."""
        dt = torch.exp(self.s4d_log_dt.float())[:, None]
        a_re, a_im = -torch.exp(self.s4d_A_log.float()), self.s4d_A_im.float()
        dta_re, dta_im = dt * a_re, dt * a_im
        e = torch.exp(dta_re)
        num_re, num_im = e * torch.cos(dta_im) - 1, e * torch.sin(dta_im)
        norm = a_re * a_re + a_im * a_im
        q_re, q_im = (num_re * a_re + num_im * a_im) / norm, (num_im * a_re - num_re * a_im) / norm  # num / A
        b, c = self.s4d_B.float(), self.s4d_C.float()
        return (dta_re, dta_im), _cmul(q_re, q_im, b[..., 0], b[..., 1]), (c[..., 0], c[..., 1])

    def ssm(self, u: torch.Tensor, ctx: SSMInput | None) -> torch.Tensor:
        """SSM(u) + D ⊙ u in float32 over u [B, P + T, H]: the P memory positions first (one segment), then the
        tokens, each segment (document) starting from the state the memory left (zero without memory)."""
        ctx = ctx or SSMInput(None)
        u = u.float()
        dta, db, c = self.coefficients()
        if ctx.prefix:
            y_mem, state = s4d_scan(u[:, :ctx.prefix], dta, db, c)
            y_tok, _ = s4d_scan(u[:, ctx.prefix:], dta, db, c, ctx.starts, state)
            y = torch.cat([y_mem, y_tok], dim=1)
        else:
            y, _ = s4d_scan(u, dta, db, c, ctx.starts)
        return y + self.s4d_D.float() * u

    def forward(self, x: torch.Tensor, ctx: SSMInput | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the scan's exponentials and sums in float32
            y = F.gelu(self.ssm(x, ctx))
        out = self.proj(y.to(x.dtype))
        return out if self.adapter is None else out + self.adapter(x)


# ---- Monarch


class MonarchLinear(nn.Module):
    """x [..., n_in] → L · P · R · x [..., n_out]: R [K, m, n_in/K] and L [K, n_out/K, m] block-diagonal with
    K blocks, m = min(n_in, n_out)/K, P the permutation that reads the [K, m] grid of R's outputs as [m, K]
    and regroups it into K blocks of m (with m >= K every block of L reads every block of R). Factors start
    as nn.Linear's default, U(±1/√fan_in) per block; `zero_init` zeroes L (an output projection)."""

    def __init__(self, n_in: int, n_out: int, blocks: int, zero_init: bool = False):
        super().__init__()
        mid = min(n_in, n_out) // blocks
        self.num_blocks = blocks
        bound_r, bound_l = 1 / math.sqrt(n_in // blocks), 1 / math.sqrt(mid)
        self.monarch_r = nn.Parameter(torch.empty(blocks, mid, n_in // blocks).uniform_(-bound_r, bound_r))
        self.monarch_l = nn.Parameter(torch.zeros(blocks, n_out // blocks, mid) if zero_init else
                                      torch.empty(blocks, n_out // blocks, mid).uniform_(-bound_l, bound_l))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], self.num_blocks
        h = torch.einsum("...ki,kmi->...km", x.reshape(*lead, k, -1), self.monarch_r.to(x.dtype))
        h = h.transpose(-1, -2).reshape(*lead, k, -1)  # P
        return torch.einsum("...km,kom->...ko", h, self.monarch_l.to(x.dtype)).reshape(*lead, -1)


class MonarchMLP(nn.Module):
    """The MLP with Monarch matrices: proj(act(fc(x))²), act relu or LeakyReLU(0.5) as the dense MLP's. Not
    covered by QAT or ortho_init (which act on dense CastedLinear weights)."""

    adapter = None  # test-time LoRA from the MLP input to its output (pgolf.ttt.lora)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = MonarchLinear(cfg.model_dim, hidden, cfg.monarch_blocks)
        self.proj = MonarchLinear(hidden, cfg.model_dim, cfg.monarch_blocks, zero_init=True)
        self.leaky = cfg.activation == "leaky_relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, 0.5) if self.leaky else torch.relu(h)
        out = self.proj(h.square())
        return out if self.adapter is None else out + self.adapter(x)
