"""A small TopK sparse autoencoder on the default model's residual stream, trained here and saved by SAELens's own
`save_model`, so that an SAE latent of the default model can be brought, measured and dreamed like any dictionary
(no SAE for SmolLM2-135M ships on PyPI, and none can be downloaded here).

It is a demonstration dictionary, not a good SAE: a few hundred Adam steps on the residual stream after one layer
(`blocks.L.hook_resid_post`) over the default bundle's corpus windows, BOS positions left out. It prints its FVU and
L0 on the held-out varied texts (text of other kinds than the corpus it was trained on).

    python experiments/sae_default.py --out ~/b/sae-layer12 [--layer 12] [--latents 2304] [--k 32] [--steps 400]
    dreaming bundle create --model default --transcoder ~/b/sae-layer12 \
        --corpus ~/.cache/dreaming/default/corpus.jsonl --tokens 20000 --out ~/b/sae
"""

import argparse
import time

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from dreaming.build.evaluate import heldout_sequences, pad_sequences
from dreaming.bundle import Bundle
from dreaming.models import HOOK_RESID_POST
from dreaming.transcoders import activate


def residuals(lm, tokens: torch.Tensor, lengths: torch.Tensor, layer: int, batch: int = 16) -> torch.Tensor:
    """The residual stream after `layer` at every position but BOS and padding: [n_tokens, d_model]."""
    rows = []
    for start in range(0, len(tokens), batch):
        part, n = tokens[start : start + batch], lengths[start : start + batch]
        width = int(n.max())
        value = lm.capture(part[:, :width], [(HOOK_RESID_POST, layer)])[(HOOK_RESID_POST, layer)]  # [b, width, d]
        keep = (torch.arange(width)[None] >= 1) & (torch.arange(width)[None] < n[:, None])
        rows.append(value[keep].float())
    return torch.cat(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder to save the SAE in (SAELens's layout)")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--latents", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--windows", type=int, default=300, help="corpus windows to train on (128 tokens each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    bundle = Bundle.open()
    lm = bundle.load_model()
    windows = bundle.windows()
    started = time.perf_counter()
    x = residuals(lm, torch.tensor(windows.tokens[: args.windows], dtype=torch.long),
                  torch.tensor(windows.lengths[: args.windows], dtype=torch.long), args.layer)
    heldout = residuals(lm, *pad_sequences(heldout_sequences(lm), lm.pad_token_id), args.layer)
    print(f"{len(x):,} training and {len(heldout):,} held-out tokens of layer {args.layer}'s residual stream "
          f"({time.perf_counter() - started:.0f} s)")

    d = x.shape[1]
    b_dec = x.mean(0)
    W_dec = torch.nn.functional.normalize(torch.randn(args.latents, d), dim=-1)
    params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(args.latents), "W_dec": W_dec, "b_dec": b_dec.clone()}
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    scale = (x - b_dec).norm(dim=-1).mean()  # inputs divided by their mean norm while training, folded in at the end

    def reconstruct(inputs):
        z = activate(((inputs - params["b_dec"]) / scale) @ params["W_enc"] + params["b_enc"], "topk", k=args.k)
        return z @ params["W_dec"] * scale + params["b_dec"], z

    started = time.perf_counter()
    for step in range(args.steps):
        batch = x[torch.randint(len(x), (4096,))]
        recon, _ = reconstruct(batch)
        loss = ((recon - batch) ** 2).sum(-1).mean() / ((batch - b_dec) ** 2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            params["W_dec"].copy_(torch.nn.functional.normalize(params["W_dec"], dim=-1))
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: training FVU {loss.item():.3f}", flush=True)
    with torch.no_grad():
        recon, z = reconstruct(heldout)
        fvu = ((recon - heldout) ** 2).sum() / ((heldout - heldout.mean(0)) ** 2).sum()
        dead = int((z.sum(0) == 0).sum())
    print(f"trained in {time.perf_counter() - started:.0f} s; held-out varied texts: FVU {fvu:.3f}, L0 {args.k}, "
          f"{dead} of {args.latents} latents never active there")

    # SAELens's TopK SAE: pre = (x - b_dec) @ W_enc + b_enc (apply_b_dec_to_input), z = topk(relu(pre)),
    # x̂ = z @ W_dec + b_dec; the training's input scale folded into W_enc and W_dec
    metadata = SAEMetadata(hook_name=f"blocks.{args.layer}.hook_resid_post", model_name=lm.name)
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=args.latents, k=args.k, apply_b_dec_to_input=True, metadata=metadata))
    with torch.no_grad():
        sae.W_enc.copy_(params["W_enc"] / scale)
        sae.b_enc.copy_(params["b_enc"])
        sae.W_dec.copy_(params["W_dec"] * scale)
        sae.b_dec.copy_(params["b_dec"])
        check = sae.decode(sae.encode(heldout[:256]))
        assert torch.allclose(check, reconstruct(heldout[:256])[0], rtol=1e-3, atol=1e-3)
    sae.save_model(args.out)
    print(f"saved to {args.out} (SAELens's layout: cfg.json + sae_weights.safetensors)")


if __name__ == "__main__":
    main()
