"""Run M3GNet weights trained with matgl's DGL implementation (matgl <= 2.x) under matgl >= 4.1.

matgl 3 moved M3GNet to PyTorch Geometric and changed two conventions; old weights load without
a missing key but give wrong energies for every compound. :func:`restore_dgl_conventions`
restores them on one loaded model instance only, never on the matgl classes: that instance and
its convolution modules are given DGL-convention subclasses of their matgl classes (the same
parameters and ``state_dict`` keys; the subclasses are attributes of this module, built on
first use so that importing it does not import matgl):

1. Node update. The DGL ``M3GNetGraphConv`` summed each bond message ``phi([v_i, v_j, e_ij])``
   into the bond's *destination* atom ``j`` (``update_all(copy_e, sum)``); matgl >= 3 sums into
   the *source* atom ``i``. ``DglM3GNetGraphConv.node_update_`` scatters into
   ``edge_index[1]``.
2. Three-body indexing. DGL enumerated the triplets ``(i->j, i->k)`` on the list of bonds
   pruned at the three-body cutoff, and then used positions in that pruned list as bond ids of
   the full graph: for the neighbour atom ``k`` (``dst[bond_ik]``), for the cutoff weights
   ``f_c(r_ij) f_c(r_ik)``, and for the bond that receives the message. The angle basis itself
   came from the pruned graph's own bond vectors (the true geometry). matgl >= 4.1 maps pruned
   positions to parent bonds everywhere. ``DglM3GNet.forward`` (:func:`dgl_forward`) builds
   the angle basis from the parent bonds and feeds the three-body layers with the DGL (pruned-position) ids.
   In a batch the pruned positions are counted per structure, as a single-structure DGL call
   did, so a batched prediction equals the one-by-one predictions.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Evaluate the first layer of the convolutions' gated MLPs per atom (see
#: :func:`split_gated_mlp`). ``False`` gives matgl's edge-wise ``hstack`` formulation (the same
#: numbers up to float32 rounding); kept as a switch for tests and benchmarks.
SPLIT_FIRST_LAYER = True


def split_gated_mlp(mlp: nn.Module, node_feat: Tensor, src: Tensor, dst: Tensor,
                    edge_feat: Tensor) -> Tensor:
    """``mlp(hstack([v[src], v[dst], e]))`` for a matgl ``GatedMLP``, cheaper on many bonds.

    The first linear layer of both branches (``layers[0]``, ``gates[0]``) acts on the
    concatenation ``[v_i, v_j, e_ij]``, so ``W [v_i, v_j, e_ij] = W_i v_i + W_j v_j + W_e e_ij``:
    ``W_i v`` and ``W_j v`` are computed once per atom and gathered per bond, and only ``W_e e``
    is a per-bond product (a third of the first layer's work; the first layer is 3/5 of the
    MLP's multiply-adds). The result equals matgl's up to float32 summation order.
    """
    # a matgl GatedMLP: two nn.Sequential stacks whose first layers are nn.Linear
    layers, gates = cast(nn.Sequential, mlp.layers), cast(nn.Sequential, mlp.gates)
    l0, g0 = cast(nn.Linear, layers[0]), cast(nn.Linear, gates[0])
    n = node_feat.size(1)
    h = l0.out_features
    w = torch.cat([l0.weight, g0.weight], dim=0)  # (2h, 2n + e)
    bias = None if l0.bias is None else torch.cat([l0.bias, g0.bias])
    first = F.linear(edge_feat, w[:, 2 * n:], bias)  # (bonds, 2h)
    # in place: the sum's backward needs none of its inputs
    first.add_(F.linear(node_feat, w[:, :n]).index_select(0, src))
    first.add_(F.linear(node_feat, w[:, n:2 * n]).index_select(0, dst))
    x, g = first[:, :h], first[:, h:]
    for layer in list(layers)[1:]:
        x = layer(x)
    for layer in list(gates)[1:]:
        g = layer(g)
    return x * g


def _splittable(mlp: nn.Module, node_feat: Tensor, edge_feat: Tensor) -> bool:
    l0 = getattr(mlp, "layers", [None])[0]
    g0 = getattr(mlp, "gates", [None])[0]
    return (isinstance(l0, nn.Linear) and isinstance(g0, nn.Linear)
            and (l0.bias is None) == (g0.bias is None)
            and l0.in_features == 2 * node_feat.size(1) + edge_feat.size(1)
            and g0.in_features == l0.in_features and g0.out_features == l0.out_features)


def _build_dgl_conv_class() -> type:
    from matgl.layers._graph_convolution import M3GNetGraphConv

    class DglM3GNetGraphConv(M3GNetGraphConv):
        """``M3GNetGraphConv`` whose node update sums bond messages into the destination atom.

        Both updates evaluate their gated MLP's first layer per atom (:func:`split_gated_mlp`)
        when :data:`SPLIT_FIRST_LAYER` is set and the block has no state features.
        """

        def _message(self, mlp: nn.Module, edge_index: Tensor, edge_feat: Tensor,
                     node_feat: Tensor, u_per_edge: Tensor | None) -> Tensor:
            src, dst = edge_index[0], edge_index[1]
            if SPLIT_FIRST_LAYER and not self.include_state and _splittable(mlp, node_feat, edge_feat):
                return split_gated_mlp(mlp, node_feat, src, dst, edge_feat)
            vi = node_feat[src]
            vj = node_feat[dst]
            if self.include_state:
                assert u_per_edge is not None
                inputs = torch.hstack([vi, vj, edge_feat, u_per_edge])
            else:
                inputs = torch.hstack([vi, vj, edge_feat])
            return mlp(inputs)

        def edge_update_(self, edge_index: Tensor, edge_feat: Tensor, node_feat: Tensor,
                         rbf: Tensor, u_per_edge: Tensor | None) -> Tensor:
            mess = self._message(self.edge_update_func, edge_index, edge_feat, node_feat, u_per_edge)
            return mess * self.edge_weight_func(rbf)

        def node_update_(self, edge_index: Tensor, edge_feat: Tensor, node_feat: Tensor,
                         rbf: Tensor, u_per_edge: Tensor | None, num_nodes: int) -> Tensor:
            dst = edge_index[1]
            mess = self._message(self.node_update_func, edge_index, edge_feat, node_feat, u_per_edge)
            mess = mess * self.node_weight_func(rbf)
            out = torch.zeros((num_nodes, mess.size(1)), dtype=mess.dtype, device=mess.device)
            return out.index_add(0, dst.to(torch.long), mess)

    return DglM3GNetGraphConv


def _build_dgl_m3gnet_class() -> type:
    from matgl.models import M3GNet

    class DglM3GNet(M3GNet):
        """``M3GNet`` with the DGL three-body indexing (see :func:`dgl_forward`)."""

        forward = dgl_forward

    return DglM3GNet


_LAZY_CLASSES = {"DglM3GNetGraphConv": _build_dgl_conv_class, "DglM3GNet": _build_dgl_m3gnet_class}


def __getattr__(name: str) -> type:
    """Build the matgl subclasses on first use (no matgl import when this module loads).

    They live at module level under their own names, so they can be found by name (pickle).
    """
    if name in globals():
        return globals()[name]
    if name in _LAZY_CLASSES:
        cls = _LAZY_CLASSES[name]()
        cls.__module__ = __name__
        cls.__qualname__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dgl_line_graph(edge_index: Tensor, bond_dist: Tensor, edge_batch: Tensor | None,
                   threebody_cutoff: float, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Triplets as (parent bond ids for the angles, DGL bond ids for everything else).

    Both are ``(2, n_triplets)``, row 0 the bond ``i->j`` receiving the message, row 1 the bond
    ``i->k``. ``edge_index`` must be sorted by source atom (matgl's neighbour lists are).
    """
    from matgl.graph._compute import _compute_3body_indices_torch

    num_bonds = int(edge_index.size(1))
    device = edge_index.device
    with torch.no_grad():
        valid = bond_dist <= threebody_cutoff
        kept = torch.nonzero(valid).squeeze(1)
        local, _, _ = _compute_3body_indices_torch(edge_index[:, valid], num_nodes)
        local = local.to(torch.long)
        parent = kept[local]
        if edge_batch is None:
            dgl_ids = torch.arange(kept.numel(), dtype=torch.long, device=device)
        else:
            eb = edge_batch.to(torch.long)
            n_graphs = int(eb.max().item()) + 1 if num_bonds else 0
            first_edge = torch.zeros(n_graphs, dtype=torch.long, device=device)
            first_edge[1:] = torch.bincount(eb, minlength=n_graphs).cumsum(0)[:-1]
            kept_graph = eb[kept]
            first_kept = torch.zeros(n_graphs, dtype=torch.long, device=device)
            first_kept[1:] = torch.bincount(kept_graph, minlength=n_graphs).cumsum(0)[:-1]
            pos = torch.arange(kept.numel(), dtype=torch.long, device=device)
            dgl_ids = first_edge[kept_graph] + pos - first_kept[kept_graph]
        legacy = dgl_ids[local]
    return parent, legacy


def dgl_forward(self: Any, g: Any, state_attr: Tensor | None = None,
                l_g: dict[str, Tensor] | None = None, return_all_layer_output: bool = False,
                **_: Any) -> Tensor:
    """``M3GNet.forward`` with the DGL three-body indexing (``DglM3GNet.forward``).

    Any cached ``l_g`` is ignored: the DGL line graph is rebuilt from ``g`` each call.
    """
    from matgl.graph._compute import compute_pair_vector_and_distance, compute_theta_and_phi
    from matgl.utils.cutoff import polynomial_cutoff

    node_types = getattr(g, "node_type", getattr(g, "z", None))
    pos = g.pos
    edge_index = g.edge_index
    pbc_offshift = getattr(g, "pbc_offshift", None)
    batch = getattr(g, "batch", None)
    num_graphs = getattr(g, "num_graphs", None)
    num_nodes = pos.size(0)
    num_bonds = edge_index.size(1)
    if num_graphs is None:
        num_graphs = 1 if batch is None else int(batch.max().item()) + 1
    edge_batch = None if batch is None else batch[edge_index[0]].to(torch.long)

    bond_vec, bond_dist = compute_pair_vector_and_distance(pos, edge_index, pbc_offshift)
    expanded_dists = self.bond_expansion(bond_dist)

    parent_lei, dgl_lei = dgl_line_graph(edge_index, bond_dist, edge_batch, self.threebody_cutoff,
                                         num_nodes)
    angles = compute_theta_and_phi(bond_vec, bond_dist, parent_lei)
    three_body_basis = self.basis_expansion(angles["triple_bond_lengths"], angles["cos_theta"],
                                            angles["phi"])
    three_body_cutoff = polynomial_cutoff(bond_dist, self.threebody_cutoff)

    node_feat, edge_feat, state_feat = self.embedding(node_types, expanded_dists, state_attr)
    if self.include_state and state_feat is not None and state_feat.dim() == 1:
        state_feat = state_feat.unsqueeze(0)

    edge_dst_atom = edge_index[1]
    n_triple_ij = torch.zeros(num_bonds, dtype=torch.long, device=edge_index.device)
    for i in range(self.n_blocks):
        edge_feat = self.three_body_interactions[i](
            edge_dst_atom, dgl_lei, n_triple_ij, num_bonds, three_body_basis, three_body_cutoff,
            node_feat, edge_feat,
        )
        edge_feat, node_feat, state_feat = self.graph_layers[i](
            edge_index, edge_feat, node_feat, state_feat, expanded_dists, batch, edge_batch,
            num_nodes, num_graphs,
        )

    if self.is_intensive:
        field_vec = self._readout(node_feat, edge_feat, batch)
        if self.include_state and state_feat is not None:
            readout_vec = torch.hstack([field_vec, state_feat.view(num_graphs, -1)])
        else:
            readout_vec = field_vec
        output = self.final_layer(readout_vec)
        if self.task_type == "classification":
            output = self.sigmoid(output)
    else:
        atomic = self.final_layer(node_feat).view(-1)
        if batch is None:
            output = atomic.sum().view(1)
        else:
            output = torch.zeros(num_graphs, dtype=atomic.dtype, device=atomic.device)
            output = output.index_add(0, batch.to(torch.long), atomic)
    return torch.squeeze(output)


def restore_dgl_conventions(model: nn.Module) -> nn.Module:
    """Make this M3GNet instance compute as matgl's DGL implementation did (in place).

    Only this instance changes: it and its blocks' ``conv`` modules get DGL-convention
    subclasses of their matgl classes (same parameters and ``state_dict`` keys); the matgl
    classes and every other instance are untouched. Idempotent.
    """
    from matgl.layers._graph_convolution import M3GNetGraphConv
    from matgl.models import M3GNet

    dgl_m3gnet = __getattr__("DglM3GNet")
    dgl_conv = __getattr__("DglM3GNetGraphConv")
    if type(model) is dgl_m3gnet:
        return model
    if type(model) is not M3GNet:
        raise TypeError(f"expected a matgl M3GNet, got {type(model).__name__}")
    for block in model.graph_layers:
        if type(block.conv) is not M3GNetGraphConv:
            raise TypeError(f"unexpected graph convolution {type(block.conv).__name__}")
        block.conv.__class__ = dgl_conv
    model.__class__ = dgl_m3gnet
    return model


def model_convention(model: nn.Module) -> str:
    """``dgl-legacy`` when :func:`restore_dgl_conventions` was applied to ``model``, else ``native``."""
    return "dgl-legacy" if type(model).__name__ == "DglM3GNet" else "native"
