"""Regenerate tests/helpers/golden_paper_logits.pt from the paper's own code.

Run once with a checkout of https://github.com/pengzhiliang/Conformer:
    python tests/helpers/make_golden.py /path/to/Conformer
The file holds numbers only: both heads' logits for each case in golden.GOLDEN_CASES, and
each variant's state_dict key -> shape table (to prove the parameter names match).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from golden import GOLDEN_CASES, GOLDEN_FILE, fill_state_dict, golden_input  # noqa: E402

PAPER_ARGS = {  # the constructor arguments of the paper's models.py
    'conformer_tiny_patch16': dict(patch_size=16, channel_ratio=1, embed_dim=384, num_heads=6),
    'conformer_small_patch16': dict(patch_size=16, channel_ratio=4, embed_dim=384, num_heads=6),
    'conformer_small_patch32': dict(patch_size=32, channel_ratio=4, embed_dim=384, num_heads=6),
    'conformer_base_patch16': dict(patch_size=16, channel_ratio=6, embed_dim=576, num_heads=9),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('paper_repo', type=Path, help='checkout of pengzhiliang/Conformer')
    args = parser.parse_args()
    sys.path.insert(0, str(args.paper_repo))
    from conformer import Conformer as PaperConformer  # the paper's conformer.py

    golden = {'shapes': {}}
    for variant, batch, height, width in GOLDEN_CASES:
        model = PaperConformer(depth=12, mlp_ratio=4, qkv_bias=True, **PAPER_ARGS[variant])
        golden['shapes'][variant] = {k: list(v.shape) for k, v in model.state_dict().items()}
        model.load_state_dict(fill_state_dict(model.state_dict()))
        with torch.no_grad():
            conv_logits, trans_logits = model.eval()(golden_input(batch, height, width))
        golden[f'{variant}@{height}x{width}'] = torch.stack([conv_logits, trans_logits])
        print(variant, height, width, conv_logits.abs().max().item(),
              trans_logits.abs().max().item())
    torch.save(golden, GOLDEN_FILE)


if __name__ == '__main__':
    main()
