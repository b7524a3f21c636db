"""Forecasting models of chapter 13, one config for the whole ladder.

Input (B, L, F): L days of F features. Output (B, H) for sequence-to-vector (the next H days), or (B, L', H) for
sequence-to-sequence (at each time step, the H days that follow it; L' = L except for the strided conv + GRU).

kinds: `linear`; `rnn-cell` (a simple RNN written out, cell by cell); `rnn` and `deep-rnn` (`torch.nn.RNN`, 1 or
`layers` layers); `ln-rnn` (layer-normalized RNN cells); `lstm`; `gru`; `conv-gru` (a strided 1D convolution
then GRUs); `wavenet` (a stack of dilated causal convolutions, van den Oord et al. 2016).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

KINDS = ["linear", "rnn-cell", "rnn", "deep-rnn", "ln-rnn", "lstm", "gru", "conv-gru", "wavenet"]


@dataclass
class ForecastConfig:
    kind: str = "rnn"
    n_features: int = 1
    seq_len: int = 56
    horizon: int = 1
    seq2seq: bool = False
    hidden: int = 32
    layers: int = 1  # recurrent layers (deep-rnn: 3 in the book)
    conv_kernel: int = 4  # conv-gru: kernel and stride of the downsampling convolution
    conv_stride: int = 2
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8] * 2)  # wavenet


class SimpleRNNCell(nn.Module):
    """h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) (chapter 13), named like torch.nn.RNN's weights."""

    def __init__(self, n_inputs: int, hidden: int, layer_norm: bool = False):
        super().__init__()
        self.ih = nn.Linear(n_inputs, hidden)
        self.hh = nn.Linear(hidden, hidden)
        # A layer-normalized cell normalizes the pre-activation, before tanh (chapter 13).
        self.norm = nn.LayerNorm(hidden) if layer_norm else nn.Identity()

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.norm(self.ih(x) + self.hh(h)))


class CellRNN(nn.Module):
    """Unrolls a cell over time: (B, L, F) -> all hidden states (B, L, hidden)."""

    def __init__(self, n_inputs: int, hidden: int, layer_norm: bool = False):
        super().__init__()
        self.hidden = hidden
        self.cell = SimpleRNNCell(n_inputs, hidden, layer_norm)

    def forward(self, x: Tensor) -> Tensor:
        cell = self.cell
        inputs = cell.ih(x)  # every step's input projection in one matrix product: only h_{t-1} is sequential
        h = x.new_zeros(x.size(0), self.hidden)
        states = []
        for t in range(x.size(1)):
            h = torch.tanh(cell.norm(inputs[:, t] + cell.hh(h)))
            states.append(h)
        return torch.stack(states, dim=1)


class CausalConv1d(nn.Conv1d):
    """A 1D convolution that sees only the past: left padding of (kernel - 1) * dilation."""

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, L)
        pad = (self.kernel_size[0] - 1) * self.dilation[0]
        return super().forward(F.pad(x, (pad, 0)))


class Forecaster(nn.Module):
    config_class = ForecastConfig

    def __init__(self, config: ForecastConfig):
        super().__init__()
        self.config = c = config
        if c.kind not in KINDS:
            raise ValueError(f"unknown forecaster kind {c.kind!r}; accepted: {', '.join(KINDS)}")
        width = c.hidden
        if c.kind == "linear":
            self.body: nn.Module = nn.Identity()
            width = c.seq_len * c.n_features
        elif c.kind in ("rnn", "deep-rnn"):
            self.body = nn.RNN(c.n_features, c.hidden, num_layers=c.layers, batch_first=True)
        elif c.kind in ("rnn-cell", "ln-rnn"):
            self.body = CellRNN(c.n_features, c.hidden, layer_norm=c.kind == "ln-rnn")
        elif c.kind == "lstm":
            self.body = nn.LSTM(c.n_features, c.hidden, num_layers=c.layers, batch_first=True)
        elif c.kind == "gru":
            self.body = nn.GRU(c.n_features, c.hidden, num_layers=c.layers, batch_first=True)
        elif c.kind == "conv-gru":
            self.conv = nn.Conv1d(c.n_features, c.hidden, c.conv_kernel, stride=c.conv_stride)
            self.body = nn.GRU(c.hidden, c.hidden, num_layers=max(2, c.layers), batch_first=True)
        elif c.kind == "wavenet":
            convs: list[nn.Module] = []
            channels = c.n_features
            for dilation in c.dilations:
                conv = CausalConv1d(channels, c.hidden, kernel_size=2, dilation=dilation)
                # Glorot-uniform weights and zero biases, as Keras initializes the book's Conv1D: with PyTorch's
                # default (smaller) weights the signal fades through the 8 ReLU layers, and 2 of 3 seeds never
                # left a constant forecast (validation MAE ~138k; 39k for the third).
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
                convs += [conv, nn.ReLU()]
                channels = c.hidden
            self.body = nn.Sequential(*convs)
        self.head = nn.Linear(width, c.horizon)

    def output_steps(self, length: int) -> slice:
        """Which of the window's time steps the sequence outputs stand for (the strided conv keeps every 2nd)."""
        if self.config.kind == "conv-gru":
            return slice(self.config.conv_kernel - 1, length, self.config.conv_stride)
        return slice(0, length)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if c.kind == "linear":
            return self.head(x.flatten(1))
        if c.kind == "conv-gru":
            x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, L', hidden)
        if c.kind == "wavenet":
            states = self.body(x.transpose(1, 2)).transpose(1, 2)  # (B, L, hidden)
        else:
            out = self.body(x)
            states = out[0] if isinstance(out, tuple) else out  # (B, L, hidden)
        if c.seq2seq:
            return self.head(states)  # (B, L, H)
        return self.head(states[:, -1])  # (B, H)


@torch.no_grad()
def rollout(model: Forecaster, window: Tensor, days: int) -> Tensor:
    """Forecast `days` ahead one day at a time with a univariate next-day model, feeding each forecast back.

    window: (B, L, 1) -> (B, days).
    """
    forecasts = []
    for _ in range(days):
        next_day = model(window)[..., :1] if not model.config.seq2seq else model(window)[:, -1, :1]
        forecasts.append(next_day)
        window = torch.cat([window[:, 1:], next_day[:, None]], dim=1)
    return torch.cat(forecasts, dim=1)
