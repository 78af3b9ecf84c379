"""Head models over frozen features: `linear` and `mlp3`, outputting one logit per label.

The modules return logits (losses take logits for numerical stability); a probability is
`torch.sigmoid` of them, one independent sigmoid per label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from heads.choices import KINDS

DEFAULT_HIDDEN = (128, 32)


@dataclass(frozen=True)
class HeadSpec:
    """Everything needed to rebuild a head's module before loading its state dict."""

    kind: str  # 'linear' | 'mlp3'
    in_dim: int
    n_out: int
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    dropout: float = 0.0
    outputs_per_label: int = 1  # 3: U-MultiClass (MultiClassHead)
    members: int = 1  # > 1: the mean of that many heads of this shape (HeadEnsemble: a grid's top cells)

    @classmethod
    def make(cls, name: str, in_dim: int, n_out: int, hidden=DEFAULT_HIDDEN, dropout: float | None = None,
             outputs_per_label: int = 1):
        """`mlp3-dropout` is mlp3 with dropout 0.5 unless a dropout is given."""
        if name not in KINDS:
            raise ValueError(f"--head {name!r}: choose from {', '.join(KINDS)}")
        if dropout is None:
            dropout = 0.5 if name == "mlp3-dropout" else 0.0
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"--dropout {dropout}: must be in [0, 1)")
        hidden = tuple(int(h) for h in hidden)
        if name != "linear" and (not hidden or min(hidden) < 1):
            raise ValueError(f"--hidden {hidden}: an mlp needs one or more positive layer sizes")
        kind = "linear" if name == "linear" else "mlp3"
        return cls(kind, int(in_dim), int(n_out), () if kind == "linear" else hidden, float(dropout),
                   int(outputs_per_label))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadSpec":
        return cls(d["kind"], int(d["in_dim"]), int(d["n_out"]), tuple(d["hidden"]), float(d["dropout"]),
                   int(d.get("outputs_per_label", 1)), int(d.get("members", 1)))

    def describe(self) -> str:
        sizes = "→".join(str(s) for s in (self.in_dim, *self.hidden, self.n_out))
        three = "x3 (U-MultiClass: a 3-way softmax per label)" if self.outputs_per_label == 3 else ""
        many = f"; the mean probability of {self.members} such heads" if self.members > 1 else ""
        return f"{self.kind} {sizes}{three}" + (f", dropout {self.dropout:g}" if self.dropout else "") + many


class MultiClassHead(nn.Module):
    """U-MultiClass (Irvin et al. 2019): each observation a 3-way softmax over negative, uncertain and
    positive. `three_way` gives the (N, K, 3) logits the loss trains; called, it gives one logit per
    label whose sigmoid is the positive probability renormalized over {negative, positive}:
    p+ / (p- + p+) = sigmoid(z+ - z-), so every consumer of logits (metrics, predict, the service)
    reads it as any head."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def three_way(self, x):
        out = self.net(x)
        return out.view(out.shape[0], -1, 3)

    def forward(self, x):
        z = self.three_way(x)
        return z[..., 2] - z[..., 0]


class HeadEnsemble(nn.Module):
    """Several trained heads answering as one: its logit is that of their mean probability, so every
    consumer of a head's logits (metrics, predict, the service) reads the ensemble as a head."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        import torch

        p = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0).clamp(1e-7, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)


def build_head(spec: HeadSpec) -> nn.Module:
    """Linear layers with ReLU between them (dropout after each ReLU when asked); no final sigmoid."""
    if spec.members > 1:
        from dataclasses import replace

        return HeadEnsemble([build_head(replace(spec, members=1)) for _ in range(spec.members)])
    layers: list[nn.Module] = []
    width = spec.in_dim
    for h in spec.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = h
    layers.append(nn.Linear(width, spec.n_out * spec.outputs_per_label))
    net = nn.Sequential(*layers)
    return MultiClassHead(net) if spec.outputs_per_label == 3 else net
