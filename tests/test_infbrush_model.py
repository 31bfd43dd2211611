"""∞-Brush denoiser: the operators against direct implementations, and exact chunked evaluation."""
import itertools

import numpy as np
import pytest
import torch

from models.infbrush import InfBrushPipeline, untrained_infbrush
from models.infbrush.config import tiny_config
from models.infbrush.denoiser import InfBrushDenoiser, token_positions
from models.infbrush.geometry import (LatticeGeometry, Stencil, lattice_grid_pairs, point_geometry,
                                      points_grid_pairs)
from models.infbrush.layers import KernelIntegral, LinearAttentionNO
from models.infbrush.sampler import Canvas, evaluate_full
from models.runtime import Canceled




def direct_cano(q_in, sources, attn: LinearAttentionNO):
    """Paper Eq. 15 written out term by term: z_n = q̃_n + 1/L Σ_l Σ_i α_n^l (q̃_n·k̃_i^l) v_i^l."""
    H, dh = attn.heads, attn.dh
    q = torch.softmax(attn.q(q_in).view(-1, H, dh), dim=-1)
    z = q.clone()
    L = len(sources)
    for y in sources:
        k = torch.softmax(attn.k(y).view(-1, H, dh), dim=-1)
        v = attn.v(y).view(-1, H, dh)
        for n in range(q.shape[0]):
            for h in range(H):
                alpha = 1.0 / sum(float(q[n, h] @ k[j, h]) for j in range(k.shape[0]))
                for i in range(k.shape[0]):
                    z[n, h] += alpha * float(q[n, h] @ k[i, h]) * v[i, h] / L
    return attn.o(z.reshape(q_in.shape[0], -1))


def test_cross_attention_neural_operator_matches_the_equation():
    torch.manual_seed(0)
    attn = LinearAttentionNO(dim=8, heads=2)
    N = 10
    q_in = torch.randn(N, 8)
    sources = [torch.randn(1, 8), torch.randn(4, 8), torch.randn(N, 8)]       # timestep, condition, coordinates
    with torch.no_grad():
        ref = direct_cano(q_in, sources, attn)
        stats = [attn.stats(y[None]) for y in sources]
        fast = attn.attend(q_in[None], stats)[0]
        assert torch.allclose(fast, ref, atol=1e-5)
        # source sums accumulate over chunks of points (what the canvas sampler does)
        coord = sources[2][None]
        a, b = attn.stats(coord[:, :3]), attn.stats(coord[:, 3:])
        chunked = [stats[0], stats[1], (a[0] + b[0], a[1] + b[1])]
        assert torch.allclose(attn.attend(q_in[None], chunked)[0], ref, atol=1e-5)
        # a one-token source contributes exactly its value vector at every point
        one = attn.attend(q_in[None], [stats[0]])[0]
        q = torch.softmax(attn.q(q_in).view(N, 2, 4), -1)
        v = attn.v(sources[0]).view(1, 2, 4)
        assert torch.allclose(one, attn.o((q + v).reshape(N, 8)), atol=1e-6)


def test_kernel_integral_lattice_equals_knn_on_points():
    torch.manual_seed(1)
    H, W, C = 12, 14, 5
    for k in (5, 9, 13):
        st = Stencil(k)
        kint = KernelIntegral(C, 8)
        v = torch.randn(H, W, C)
        rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        px = torch.stack([rows, cols], -1).reshape(1, H * W, 2).float()
        with torch.no_grad():
            pts = kint.forward_points(v.reshape(1, H * W, C), point_geometry(px, k)).reshape(H, W, C)
            geo = LatticeGeometry.build(st, torch.arange(H)[None], torch.arange(W)[None], H, W)
            lat = kint.forward_lattice(v[None, None], geo)[0, 0]
        # away from the border (where the k-NN density estimate of the neighbours sees the edge) they agree
        r = 2 * st.radius
        assert torch.allclose(lat[r:H - r, r:W - r], pts[r:H - r, r:W - r], atol=1e-5)
    with pytest.raises(ValueError, match="ties"):
        Stencil(7)


@pytest.mark.parametrize("H,W,N,k", [(96, 96, 1500, 9), (40, 130, 900, 5), (32, 32, 1024, 9)])
def test_cell_knn_is_exact_and_linear_time(H, W, N, k):
    """The bucketed k-NN used for training point sets returns the brute-force neighbour distances (incl. queries
    outside the image — grid nodes of a non-square canvas — and a fully sampled lattice full of ties)."""
    from models.infbrush.geometry import knn_brute, knn_cells, node_positions_px

    g = torch.Generator().manual_seed(H + N)
    flat = torch.randperm(H * W, generator=g)[:N]
    p = torch.stack([flat // W, flat % W], -1).float()
    i1, d1 = knn_cells(p, p, k, H, W)
    i2, d2 = knn_brute(p, p, k)
    assert torch.equal(d1, d2)
    assert torch.equal(i1[:, 0], torch.arange(N))                     # itself first (distance 0, unique)
    nodes = node_positions_px(8, H, W).float()
    assert torch.equal(knn_cells(nodes, p, 3, H, W)[1], knn_brute(nodes, p, 3)[1])
    # a deliberately tiny reach forces the brute-force fallback for most queries; still exact
    assert torch.equal(knn_cells(p, p, k, H, W, cell=1, reach=1)[1], d2)


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_brute_knn_equals_the_pairwise_formula_ties_included(chunk):
    """knn_brute forms dy² + dx² per coordinate on small blocks: the same neighbours and distances, in the same
    order, as squaring the (Q, N, 2) difference and summing it — on dense 32² training patches (full of ties at
    the patch edges) and on non-integer points."""
    from models.infbrush.geometry import knn_brute
    from training.infbrush import sample_patches

    g = torch.Generator().manual_seed(3)
    flat = sample_patches(2048, 256, 256, 32, g)
    lattice = torch.stack([flat // 256, flat % 256], -1).float()
    for p in (lattice, torch.rand(700, 2, generator=g) * 50):
        dist = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
        d_ref, i_ref = dist.topk(9, dim=-1, largest=False, sorted=True)
        i, d = knn_brute(p, p, 9, chunk)
        assert torch.equal(d, d_ref) and torch.equal(i, i_ref)


def brute_grid_pairs(H, W, G, K):
    side = max(H, W)
    sel = []
    for gy, gx in itertools.product(range(G), range(G)):
        ny = (2 * gy + 1) * side - G * (1 + side - H)
        nx = (2 * gx + 1) * side - G * (1 + side - W)
        cands = sorted(((2 * G * i - ny) ** 2 + (2 * G * j - nx) ** 2, i, j) for i in range(H) for j in range(W))
        sel.append([(i, j) for _, i, j in cands[:K]])
    return sel


@pytest.mark.parametrize("H,W,G,K", [(37, 29, 8, 3), (16, 16, 8, 4), (6, 50, 4, 3)])
def test_lattice_grid_transfer_is_exact_knn(H, W, G, K):
    gp = lattice_grid_pairs(H, W, G, K)
    pix = gp.pixels[gp.pairs.source].reshape(G * G, K, 2).tolist()
    assert [[tuple(p) for p in node] for node in pix] == brute_grid_pairs(H, W, G, K)
    w = gp.pairs.weight.reshape(G * G, K)
    assert torch.allclose(w.sum(-1), torch.ones(G * G))
    # points mode on the full lattice selects the same neighbour sets (no ties straddle the K-th place here)
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    px = torch.stack([rows, cols], -1).reshape(1, H * W, 2).float()
    pp = points_grid_pairs(px, [H], [W], G, K)
    src = pp.source.reshape(G * G, K)
    got = [sorted((int(s) // W, int(s) % W) for s in node) for node in src]
    assert got == [sorted(node) for node in brute_grid_pairs(H, W, G, K)]


def _ctx(model, H, W, B=2, grid=(2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, grid[0] * grid[1], 512, generator=g)
    pos = token_positions(*grid, H, W)[None].expand(B, -1, -1)
    drop = torch.tensor([False, True][:B])
    return model.context(torch.full((B,), 700), emb, pos, drop)


@pytest.mark.parametrize("H,W", [(40, 56), (33, 21)])
def test_chunked_evaluation_equals_one_shot(H, W):
    model = untrained_infbrush(seed=3).denoiser
    x = torch.randn(H, W, 3, generator=torch.Generator().manual_seed(1)) * 0.7
    with torch.no_grad():
        ctx = _ctx(model, H, W)
        ref = evaluate_full(model, x, ctx, 2)
        assert float(ref.abs().max()) > 0.05
        for chunk in (49, 150, 10 ** 6):
            cv = Canvas(model, H, W, chunk)
            got = cv.predict_eps(x, ctx, 2)
            assert float((got - ref).abs().max()) < 1e-4, chunk
        assert Canvas(model, H, W, 49).n_tiles >= 12


def test_one_shot_lattice_evaluation_depends_on_far_pixels():
    """The global operators really are global: changing one far pixel changes the output everywhere (so the
    chunk-equality test above is not passing because the network is local)."""
    model = untrained_infbrush(seed=3).denoiser
    H, W = 32, 32
    x = torch.randn(H, W, 3, generator=torch.Generator().manual_seed(2)) * 0.5
    with torch.no_grad():
        ctx = _ctx(model, H, W)
        a = evaluate_full(model, x, ctx, 2)
        x2 = x.clone()
        x2[31, 31] += 1.0
        b = evaluate_full(model, x2, ctx, 2)
    assert float((a[:, :8, :8] - b[:, :8, :8]).abs().max()) > 1e-6


def _sample(pipe, emb, guidance, seed=0, chunk=10 ** 6, H=24, W=32, steps=2):
    return torch.cat([b for _, _, b in pipe.sample_float_bands(H, W, embedding=emb, seed=seed, steps=steps,
                                                               guidance=guidance, chunk_pixels=chunk)])


def test_conditioning_changes_output_and_guidance_zero_ignores_it():
    model = untrained_infbrush(seed=0).denoiser
    H, W = 24, 32
    x = torch.randn(H, W, 3, generator=torch.Generator().manual_seed(4)) * 0.5
    rng = np.random.RandomState(0)
    e1, e2 = torch.tensor(rng.randn(1, 1, 512)).float(), torch.tensor(rng.randn(1, 1, 512)).float()
    pos = token_positions(1, 1, H, W)[None]
    with torch.no_grad():
        def eps(e, drop):
            return evaluate_full(model, x, model.context(torch.tensor([600]), e, pos, torch.tensor([drop])), 1)
        a, b = eps(e1, False), eps(e2, False)
        assert float((a - b).abs().max()) > 1e-3 * float(a.abs().max())      # the condition reaches the output
        assert torch.equal(eps(e1, True), eps(e2, True))                      # the null branch never sees it
    # end to end: guidance 0 gives the unconditional sample whatever the embedding; guidance 1 does not
    pipe = InfBrushPipeline(untrained_infbrush(seed=0), "cpu")
    v1, v2 = rng.randn(512), rng.randn(512)
    u1, u2 = _sample(pipe, v1, 0.0), _sample(pipe, v2, 0.0)
    assert torch.equal(u1, u2)
    assert torch.equal(u1, _sample(pipe, None, 3.0))
    assert not torch.equal(_sample(pipe, v1, 1.0), _sample(pipe, v2, 1.0))
    g = _sample(pipe, v1, 2.0)                                   # CFG mixes the two branches
    assert not torch.equal(g, _sample(pipe, v1, 1.0)) and not torch.equal(g, u1)
    # a spatial grid of embeddings is accepted and is not the same condition as its mean vector
    grid = rng.randn(2, 2, 512)
    assert not torch.equal(_sample(pipe, grid, 1.0), _sample(pipe, grid.mean((0, 1)), 1.0))


def test_sampling_is_deterministic_and_chunking_only_rounds():
    pipe = InfBrushPipeline(untrained_infbrush(seed=0), "cpu")
    e = np.random.RandomState(1).randn(512)
    a = _sample(pipe, e, 2.0, seed=5, H=30, W=44, steps=3)
    assert torch.equal(a, _sample(pipe, e, 2.0, seed=5, H=30, W=44, steps=3))
    assert float((a - _sample(pipe, e, 2.0, seed=6, H=30, W=44, steps=3)).abs().max()) > 1e-2
    c = _sample(pipe, e, 2.0, seed=5, H=30, W=44, steps=3, chunk=100)
    # the same function: the network agrees to float rounding (test above), but a rounding difference of ~1e-7 in ε̂
    # is amplified by 1/√ᾱ ≈ 2·10⁴ at the first DDIM step (and by the untrained network after it), so a few values
    # move by up to ~1e-2 while almost all agree to 1e-5 (a halo or ordering error would move whole tile borders)
    d = (a - c).abs()
    assert float(d.max()) < 5e-2 and float(d.mean()) < 1e-4 and float((d > 1e-3).float().mean()) < 0.01


def test_sample_bands_stream_progress_and_cancel():
    pipe = InfBrushPipeline(untrained_infbrush(seed=0), "cpu")
    calls = []
    bands = list(pipe.sample_bands(height=40, width=24, embedding=np.ones(512), seed=1, steps=2, guidance=1.0,
                                   chunk_pixels=200, progress=lambda d, t: calls.append((d, t))))
    assert all(b.dtype == np.uint8 and b.shape[1:] == (24, 3) for b in bands)
    assert sum(b.shape[0] for b in bands) == 40 and len(bands) > 1
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == list(range(1, len(calls) + 1))
    with pytest.raises(Canceled):
        list(pipe.sample_bands(height=40, width=24, embedding=np.ones(512), steps=2, chunk_pixels=200,
                               cancel=lambda: len(calls) > 3, progress=lambda d, t: calls.append((d, t))))


def test_training_forward_on_points_runs_and_is_differentiable():
    cfg = tiny_config()
    model = InfBrushDenoiser(cfg)
    B, N, H, W = 2, 200, 20, 30
    g = torch.Generator().manual_seed(0)
    flat = torch.stack([torch.randperm(H * W, generator=g)[:N] for _ in range(B)])
    px = torch.stack([flat // W, flat % W], -1).float()
    from models.infbrush.geometry import pixel_to_unit

    xy = pixel_to_unit(px[..., 0].long(), px[..., 1].long(), H, W)
    ctx = model.context(torch.tensor([10, 900]), torch.randn(B, 1, 512), token_positions(1, 1, H, W)[None].expand(B, -1, -1),
                        torch.tensor([False, True]))
    out = model(torch.randn(B, N, 3), xy, ctx, point_geometry(px, cfg.knn_k),
                points_grid_pairs(px, [H, H], [W, W], cfg.grid_size, cfg.grid_knn))
    assert out.shape == (B, N, 3)
    out.square().mean().backward()
    assert model.down[0].kint.kernel[0].weight.grad is not None
    assert model.cano.attn.k.weight.grad.abs().sum() > 0
