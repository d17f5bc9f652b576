"""Numeric feature embeddings, shared by the router and every expert.

Each embedded column becomes a small vector instead of one number (Gorishniy et al.,
NeurIPS 2022, "On Embeddings for Numerical Features in Tabular Deep Learning"), which lets
the first linear layer learn a piecewise or periodic function of every feature, the kind
of axis-aligned structure that trees find easily and plain MLPs do not:

- ``"piecewise_linear"``: the column's quantile bins (computed from the training data,
  :func:`quantile_bins`), encoded as ``[1, ..., 1, fraction of the current bin, 0, ..., 0]``
  and mapped linearly to ``d_embedding`` values, plus a linear term (the "B" variant used
  by TabM, which starts as a plain linear embedding).
- ``"periodic"``: ``cos`` and ``sin`` of learned frequencies, then a shared linear layer
  and ReLU (PLR "lite").

The encodings come from the ``rtdl_num_embeddings`` package, written by the papers'
authors. Columns with two or fewer distinct values (one-hot indicators, flags, constants)
gain nothing from an embedding and pass through unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._warnings import ignoring_warnings

NUMERIC_EMBEDDINGS = ("periodic", "piecewise_linear")
#: Quantile bins per column of the piecewise-linear embedding (fewer with few rows or values).
N_BINS = 48
#: Embedding width per column.
D_EMBEDDING = {"piecewise_linear": 16, "periodic": 24}
#: Frequencies per column of the periodic embedding, and the scale of their initialisation.
N_FREQUENCIES = 48
FREQUENCY_INIT_SCALE = 0.01
#: Columns with at most this many distinct values are not embedded.
MAX_PASSTHROUGH_VALUES = 2
#: Bins are computed from at most this many rows (quantiles of a random subsample).
MAX_BIN_ROWS = 200_000
#: Narrowest bin: the encoding divides by each bin's width, and a narrower one (a subnormal
#: gap, such as the scaled value of 0 next to 0) could make that inf and the encoding NaN.
#: The columns arrive scaled (about unit spread, clipped to +-3), where such a gap is noise.
MIN_BIN_WIDTH = 1e-30


def embedded_columns(X: torch.Tensor) -> list[int]:
    """Indices of the columns of ``X`` worth embedding: more than two distinct values.

    Parameters
    ----------
    X : Tensor of shape (n, n_features)
        Training features.

    Returns
    -------
    list of int
    """
    columns = []
    for j in range(X.shape[1]):
        values = X[:, j].unique()
        if values.shape[0] > MAX_PASSTHROUGH_VALUES:
            columns.append(j)
    return columns


def quantile_bins(X: torch.Tensor, n_bins: int = N_BINS, generator: torch.Generator | None = None
                  ) -> list[torch.Tensor]:
    """Bin edges of every column of ``X`` at its quantiles, duplicates removed.

    Parameters
    ----------
    X : Tensor of shape (n, n_columns)
        Training values of the embedded columns, each with at least two distinct values.
    n_bins : int, default=48
        At most this many bins per column (and fewer than ``n``).
    generator : torch.Generator, optional
        Draws the subsample when ``n`` exceeds :data:`MAX_BIN_ROWS`.

    Returns
    -------
    list of Tensor
        Per column, the increasing bin edges (at least two), none closer than
        :data:`MIN_BIN_WIDTH` to the next where the column spans more than that.
    """
    from rtdl_num_embeddings import compute_bins

    if X.shape[0] > MAX_BIN_ROWS:
        X = X[torch.randperm(X.shape[0], generator=generator)[:MAX_BIN_ROWS].to(X.device)]
    n_bins = max(2, min(n_bins, X.shape[0] - 1))
    with _single_bins_allowed():
        return [_without_narrow_bins(edges) for edges in compute_bins(X.float(), n_bins=n_bins)]


def _without_narrow_bins(edges: torch.Tensor) -> torch.Tensor:
    """``edges`` without those closer than :data:`MIN_BIN_WIDTH` to the last one kept (the
    last edge, the column's maximum, replaces the one before it when they are that close)."""
    values = edges.tolist()
    if values[-1] - values[0] < MIN_BIN_WIDTH or all(b - a >= MIN_BIN_WIDTH for a, b in zip(values, values[1:])):
        return edges
    kept = [values[0]]
    for value in values[1:]:
        if value - kept[-1] >= MIN_BIN_WIDTH:
            kept.append(value)
    kept[-1] = values[-1]
    return torch.tensor(kept, dtype=edges.dtype, device=edges.device)


@contextlib.contextmanager
def _single_bins_allowed():
    # A column whose quantiles collapse to two edges has one bin: that is min-max scaling,
    # which rtdl_num_embeddings warns about (computing the bins and building the embedding);
    # it is what a 3-valued column should get.
    with ignoring_warnings(".*just two bin edges.*"):
        yield


def fit_embedding_layout(X: torch.Tensor, kind: str | None, generator: torch.Generator | None = None):
    """Which columns an embedding of ``kind`` takes, and their bins, from training data.

    Parameters
    ----------
    X : Tensor of shape (n, n_features)
        Training features.
    kind : {"periodic", "piecewise_linear"} or None
    generator : torch.Generator, optional
        See :func:`quantile_bins`.

    Returns
    -------
    columns : list of int
        :func:`embedded_columns` (none without an embedding).
    n_bins : list of int
        Bins per embedded column (``"piecewise_linear"`` only; else empty).
    bins : list of Tensor or None
        The bin edges (``"piecewise_linear"`` only).
    """
    if kind is None:
        return [], [], None
    columns = embedded_columns(X)
    if not columns or kind != "piecewise_linear":
        return columns, [], None
    bins = quantile_bins(X[:, columns], generator=generator)
    return columns, [edges.shape[0] - 1 for edges in bins], bins


class NumericEmbedding(nn.Module):
    """Embed some columns of the input and pass the others through.

    ``forward(x)`` returns ``cat(embedding(x[:, columns]).flatten(1), x[:, others])``, of
    width ``len(columns) * d_embedding + len(others)``.

    Parameters
    ----------
    kind : {"periodic", "piecewise_linear"}
    n_features : int
        Input width.
    columns : sequence of int
        The columns to embed (at least one).
    bins : list of Tensor, optional
        ``"piecewise_linear"``: the bin edges of every embedded column
        (:func:`quantile_bins`).
    n_bins : sequence of int, optional
        ``"piecewise_linear"`` without ``bins``: the number of bins of every embedded
        column. The edges are then placeholders, to be replaced by ``load_state_dict`` (this
        is how a saved model is rebuilt).
    """

    def __init__(self, kind: str, n_features: int, columns, bins: list[torch.Tensor] | None = None,
                 n_bins=None):
        super().__init__()
        import rtdl_num_embeddings

        if kind not in NUMERIC_EMBEDDINGS:
            raise ValueError(f"numeric_embedding must be one of {NUMERIC_EMBEDDINGS} or None, got {kind!r}")
        columns = [int(c) for c in columns]
        if not columns or not all(0 <= c < n_features for c in columns) or len(set(columns)) != len(columns):
            raise ValueError(f"columns must be distinct indices in [0, {n_features}), at least one; got {columns}")
        self.kind = kind
        self.n_features = n_features
        self.d_embedding = D_EMBEDDING[kind]
        others = [c for c in range(n_features) if c not in set(columns)]
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.register_buffer("others", torch.tensor(others, dtype=torch.long), persistent=False)
        if kind == "periodic":
            self.embedding = rtdl_num_embeddings.PeriodicEmbeddings(
                len(columns), self.d_embedding, n_frequencies=N_FREQUENCIES,
                frequency_init_scale=FREQUENCY_INIT_SCALE, lite=True)
            self.n_bins = None
        else:
            if bins is None:
                if n_bins is None:
                    raise ValueError("piecewise_linear needs bins (or n_bins, to be loaded)")
                bins = [torch.linspace(0.0, 1.0, int(count) + 1, device="cpu") for count in n_bins]
            if len(bins) != len(columns):
                raise ValueError(f"got bins for {len(bins)} columns, expected {len(columns)}")
            self.n_bins = [int(edges.shape[0]) - 1 for edges in bins]
            # Built on the CPU even under a meta-device context (a saved model's skeleton):
            # rtdl_num_embeddings reads the edges' values while building.
            with torch.device("cpu"), _single_bins_allowed():
                self.embedding = rtdl_num_embeddings.PiecewiseLinearEmbeddings(
                    [edges.float().cpu() for edges in bins], self.d_embedding, activation=False, version="B")

    @property
    def out_features(self) -> int:
        """Width of the output."""
        return self.columns.shape[0] * self.d_embedding + self.others.shape[0]

    @property
    def chunks(self) -> list[int]:
        """Widths of the output's per-column pieces, in output order."""
        return [self.d_embedding] * self.columns.shape[0] + [1] * self.others.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed the chosen columns and pass the others through.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The input rows.

        Returns
        -------
        Tensor of shape (n, out_features)
            The embedded columns' vectors side by side, then the other columns.
        """
        embedded = self.embedding(x.index_select(1, self.columns).float()).flatten(1)
        if self.others.shape[0] == 0:
            return embedded
        return torch.cat((embedded, x.index_select(1, self.others).to(embedded.dtype)), dim=1)


#: Width of a categorical column's learned embedding (as RealMLP's).
D_CATEGORY_EMBEDDING = 8


class CategoricalEmbedding(nn.Module):
    """Learned embeddings of integer-coded categorical columns.

    Column ``j`` holds codes in ``[0, cardinalities[j])``; each code has a learned vector of
    ``d_embedding`` values, except code 0, which is reserved for a category unseen in
    training and maps to zeros (it has no vector to learn from). Codes arrive as floats, the
    way the rest of the input does, and are exact up to ``2**24``. All columns share one
    table, offset per column, so that a forward pass is a single lookup.

    Parameters
    ----------
    cardinalities : sequence of int
        Codes per column, each at least 2 (the reserved code and one category).
    d_embedding : int, default=8
        Width of every vector.
    """

    def __init__(self, cardinalities, d_embedding: int = D_CATEGORY_EMBEDDING):
        super().__init__()
        cardinalities = [int(c) for c in cardinalities]
        if not cardinalities or min(cardinalities) < 2 or max(cardinalities) > 2**24:
            raise ValueError(f"cardinalities must be at least one count, each in [2, 2**24]; got {cardinalities}")
        self.cardinalities = cardinalities
        self.d_embedding = int(d_embedding)
        starts = torch.tensor([0, *cardinalities[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("starts", starts, persistent=False)
        self.register_buffer("limits", torch.tensor(cardinalities, dtype=torch.float32), persistent=False)
        self.table = nn.Embedding(sum(cardinalities), self.d_embedding)
        # Unit scale, as a one-hot input's and a robustly scaled numeric input's. Against
        # rtdl's uniform +-1/sqrt(d), in 3-fold CV with every column past 8 categories
        # embedded (benchmarks.categorical) neither won: hpc_data accuracy 0.761 against
        # 0.749, but ames R^2 0.8989 against 0.8995, attrition accuracy 0.876 against 0.883,
        # sacramento R^2 0.647 against 0.655.
        nn.init.normal_(self.table.weight, std=1.0)

    @property
    def n_columns(self) -> int:
        """Number of categorical columns."""
        return len(self.cardinalities)

    @property
    def out_features(self) -> int:
        """Width of the output: ``n_columns * d_embedding``."""
        return self.n_columns * self.d_embedding

    @torch.no_grad()
    def zero_unused(self, codes: torch.Tensor) -> None:
        """Set to zeros the vectors of the codes that no row of ``codes`` holds.

        Training never moves them (no row reads them), so they would keep their random
        initial values; zero, they read as an unseen category (code 0) does. For a
        category or missing value that the training rows lack (it is in the validation
        rows only, or a column has no missing value in fit), and that prediction may meet.

        Parameters
        ----------
        codes : Tensor of shape (n, n_columns)
            The training rows' codes, as :meth:`forward` takes them.
        """
        used = torch.zeros(self.table.num_embeddings, dtype=torch.bool, device=self.table.weight.device)
        used[(codes.long() + self.starts).flatten()] = True
        self.table.weight[~used] = 0.0

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """The columns' vectors side by side.

        Parameters
        ----------
        codes : Tensor of shape (n, n_columns)
            Integer codes, as any dtype; 0 for a category unseen in training. A code that
            is not a whole number in ``[0, cardinalities[j])`` is an error (a
            ``RuntimeError``, raised on the CPU at once and on a GPU by the device).

        Returns
        -------
        Tensor of shape (n, n_columns * d_embedding)
            Zeros where a code is 0.
        """
        # Checked on the device (no synchronisation): a code past its column's count would
        # read the next column's vectors.
        torch._assert_async(((codes >= 0) & (codes < self.limits) & (codes == codes.floor())).all(),
                            "CategoricalEmbedding: a code is not a whole number in [0, cardinality) of its column")
        codes = codes.long()
        vectors = self.table(codes + self.starts) * (codes > 0).unsqueeze(-1).to(self.table.weight.dtype)
        return vectors.flatten(1)
