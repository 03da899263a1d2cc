import sys, torch
sys.path.insert(0, "tests")
from random_specs import random_spec, random_m, random_logits, random_layer_weights, input_kind
from moe_fusion.lowering import topk_kernel, reference
for seed in (121, 239, 91, 245):
    spec = random_spec(seed); kind = input_kind(seed); M = random_m(seed, big=40)
    logits = random_logits(spec, M, seed, kind)
    bias = random_layer_weights(spec, seed, kind, experts=False).correction_bias
    seen = logits if spec.router_fp32 or spec.torch_dtype == torch.float32 else logits.to(spec.torch_dtype).float()
    ref_ids, ref_w = reference.select_experts(spec, seen, bias)
    for sort, warps in ((True, 4), (False, 4), (True, 2), (True, 1)):
        topk_kernel.picks_by_sort = lambda w, meta, s=sort: s
        topk_kernel.ROUTE_WARPS = warps
        ids, w = topk_kernel.select_experts(spec, logits.cuda(), None if bias is None else bias.cuda(), spec.torch_dtype)
        ids, w = ids.cpu(), w.cpu()
        bad = ~(ids == ref_ids).all(-1) | ~torch.isclose(w, ref_w.float(), rtol=1e-4, atol=1e-6).all(-1)
        print(f"seed {seed} sort {sort} warps {warps} M {M} E {spec.num_experts} G {spec.n_group} kg {spec.topk_group} k {spec.top_k} "
              f"bad rows {bad.nonzero().flatten().tolist()}")
        for r in bad.nonzero().flatten().tolist()[:3]:
            print("  row", r, "logits", seen[r].tolist(), "bias", None if bias is None else bias.tolist())
            print("    ids", ids[r].tolist(), "ref", ref_ids[r].tolist(), "w", w[r].tolist(), "ref", ref_w[r].tolist())
