"""``conformer-benchmark``: the eager reference against the deploy modes, for inference and
training, as markdown tables and a JSON file (the harness is :mod:`conformer.benchmark`)."""
import argparse
import json
import os
import sys
from typing import Callable, List, Optional, Sequence

import torch

from conformer.benchmark import FLOAT_MODES, MODES, PEERS, run
from conformer.cli.common import output_file

__all__ = ['format_table', 'main']


def format_table(result: dict) -> str:
    """Markdown tables: each variant's inference and training rows and, for several variants,
    a summary with one row per variant and batch size.

    Args:
        result: :func:`conformer.benchmark.run` output.
    """
    s = result['settings']
    short = dict(float32='fp32', bfloat16='bf16')
    peaks = ', '.join(
        f'{short[dt]} '
        + ' / '.join(f'{rate:.0f} ({route})' for route, rate in rates.items())
        for dt, rates in result['matmul_route_gflops'].items())
    lines = [f"{result['machine']['cpu']}, {result['machine']['threads']} threads, "
             f"compile={s['compile']}, keep_freed_memory={s['keep_freed_memory']}; "
             f"GEMM GFLOP/s at start {peaks}, the faster route is the peak; speed-up and "
             f"% peak = ratios of the medians of interleaved rounds"]
    for v in result['variants']:
        lines += ['', f"{v['variant']} @ {v['image_size']}px ({v['params_m']:.2f}M parameters)"]
        lines += _inference_table(v['inference']) + _speedup_table(v['inference'])
        lines += _training_table(v['training'])
    if len(result['variants']) > 1:
        lines += _summary_table(result['variants'])
    return '\n'.join(lines)


def _markdown(header: Sequence[str], rows: List[dict], keys: Sequence[str],
              cells: Callable[[dict], List[str]]) -> List[str]:
    """A table: each row's ``keys`` values, then ``cells(row)``, or its status if skipped."""
    if not rows:
        return []
    lines = ['', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in rows:
        row = [str(r[k]) for k in keys]
        row += cells(r) if r['status'] == 'ok' else [r['status']] + [''] * (
            len(header) - len(keys) - 1)
        lines.append('| ' + ' | '.join(row) + ' |')
    return lines


def _optional(value: Optional[float], spec: str) -> str:
    return '' if value is None else format(value, spec)


def _inference_table(rows: List[dict]) -> List[str]:
    return _markdown(
        ('mode', 'batch', 'img/s', 'p50 ms', 'p90 ms', 'peak MB', 'GFLOP/s', '% peak',
         'speed-up', 'top-1 agreement', 'max abs diff'), rows, ('mode', 'batch'),
        lambda r: [f"{r['images_per_s']:.3g}", f"{r['latency_ms_p50']:.0f}",
                   f"{r['latency_ms_p90']:.0f}", _optional(r['peak_memory_mb'], '.0f'),
                   f"{r['achieved_gflops']:.3g}",
                   _optional(r['pct_of_matmul_peak'], '.0f') + '%' * (
                       r['pct_of_matmul_peak'] is not None),
                   f"{r['speedup_vs_eager']:.2f}x",
                   f"{100 * r['top1_agreement']:.1f}% of {r['agreement_images']}",
                   f"{r['max_abs_logit_diff']:.1e}"])


def _speedup_table(rows: List[dict]) -> List[str]:
    """One row per measured mode, one column per batch size: speed-up over ``eager`` and top-1
    agreement with it, the shape of a side-by-side comparison of engines."""
    batches = list(dict.fromkeys(r['batch'] for r in rows))
    modes = list(dict.fromkeys(r['mode'] for r in rows if r['status'] == 'ok'))
    if len(modes) < 2:
        return []
    cell = {(r['mode'], r['batch']): r for r in rows}
    lines = ['', '| engine | ' + ' | '.join(f'batch {b}' for b in batches) + ' |',
             '|' + '---|' * (len(batches) + 1)]
    for mode in modes:
        lines.append(f'| {mode} | ' + ' | '.join(
            f"x{cell[mode, b]['speedup_vs_eager']:.2f} "
            f"({100 * cell[mode, b]['top1_agreement']:.0f}% top-1)"
            if cell[mode, b]['status'] == 'ok' else cell[mode, b]['status']
            for b in batches) + ' |')
    return lines


def _training_table(rows: List[dict]) -> List[str]:
    return _markdown(
        ('train mode', 'batch', 'grad checkpointing', 'img/s', 'step ms', 'peak MB', 'memory saved',
         'speed-up', 'loss diff'), rows, ('mode', 'batch', 'grad_checkpointing'),
        lambda r: [f"{r['images_per_s']:.3g}", f"{r['step_ms_p50']:.0f}",
                   f"{r['peak_memory_mb']:.0f}",
                   f"{r['memory_saved_pct']:.0f}%" if 'memory_saved_pct' in r else '',
                   f"{r['speedup_vs_eager']:.2f}x", f"{r['loss_abs_diff_vs_eager']:.1e}"])


def _summary_table(variants: List[dict]) -> List[str]:
    """img/s of every measured mode (speed-up over eager in brackets) per variant and batch."""
    modes = [m for m in MODES if any(r['mode'] == m and r['status'] == 'ok'
                                     for v in variants for r in v['inference'])]
    rows = []
    for v in variants:
        for batch in dict.fromkeys(r['batch'] for r in v['inference']):
            runs = {r['mode']: r for r in v['inference'] if r['batch'] == batch}
            rows.append(dict(model=v['variant'], params=f"{v['params_m']:.2f}", batch=batch,
                             status='ok', runs=[runs[m] for m in modes]))

    def rate(r: dict) -> str:
        if r['status'] != 'ok':
            return ''
        return f"{r['images_per_s']:.3g}" + (
            '' if r['mode'] == 'eager' else f" ({r['speedup_vs_eager']:.2f}x)")

    return _markdown(('model', 'params (M)', 'batch', *(f'{m} img/s' for m in modes)), rows,
                     ('model', 'params', 'batch'), lambda row: [rate(r) for r in row['runs']])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``conformer-benchmark`` command; returns its exit status, 0.

    Args:
        argv: command-line arguments (``--help`` lists them); None reads ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(
        prog='conformer-benchmark',
        description='Benchmark Conformer variants: the eager reference against the deploy '
                    'modes (fp32, bf16, int8) and, when installed, ONNX Runtime and OpenVINO. '
                    'Set OMP_WAIT_POLICY=ACTIVE for steadier timings of PyTorch modes alone, '
                    'never with the peers: idle PyTorch threads would spin during their turns.')
    parser.add_argument('--model', nargs='+',
                        help='one or more registered variants, benchmarked in turn '
                             '(default: conformer_small_patch16)')
    parser.add_argument('--batch-sizes', type=int, nargs='*',
                        help='inference batch sizes (default: 1 8 32; none: skip inference)')
    parser.add_argument('--train-batch', type=int, help='training batch size (default: 8)')
    parser.add_argument('--image-size', type=int,
                        help="input size (default: each model's pretrained_cfg size, 224 px "
                             "for the paper's variants)")
    parser.add_argument('--rounds', type=int, help='timed rounds per config (default: 9)')
    parser.add_argument('--warmup', type=int, help='untimed calls per config (default: 2)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the fp32/bf16 modes (inductor freezing for inference)')
    parser.add_argument('--modes', nargs='+', choices=MODES,
                        help='modes to measure (default: all; --smoke: '
                             + ' '.join(FLOAT_MODES) + '); peers: ' + ' '.join(PEERS))
    parser.add_argument('--calibration',
                        help='a folder of <class>/<image> files: 512 of its images calibrate '
                             'the int8 modes, 64 others measure top-1 agreement (default: '
                             'seeded random images)')
    parser.add_argument('--skip-training', action='store_true')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help='CPU: keep freed memory for reuse instead of glibc handing it back '
                             '(as the trainer does), so no mode pays page faults')
    parser.add_argument('--threads', type=int,
                        help="intra-op threads (default: torch's, one per core); 1 gives steadier "
                             "ratios when other jobs share the cores")
    parser.add_argument('--json', default='benchmark.json', help='where to write the results')
    parser.add_argument('--smoke', action='store_true',
                        help='a seconds-long run on a tiny model (for CI): checks the tool, '
                             'not the speed')
    args = parser.parse_args(argv)
    for flag, value in (('--threads', args.threads), ('--train-batch', args.train_batch),
                        ('--image-size', args.image_size), ('--rounds', args.rounds),
                        ('--warmup', args.warmup),
                        *(('--batch-sizes', b) for b in args.batch_sizes or ())):
        if value is not None and value < 1:
            parser.error(f'{flag} must be >= 1, got {value}')
    if args.smoke and (args.model or args.batch_sizes or args.image_size or args.rounds
                       or args.warmup or args.train_batch):
        parser.error('--smoke picks its own tiny model, sizes and rounds; drop --model, '
                     '--batch-sizes, --image-size, --rounds, --warmup and --train-batch')
    defaults = dict(model=['conformer_small_patch16'], batch_sizes=[1, 8, 32], rounds=9,
                    warmup=2, train_batch=8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    spinning = os.environ.get('OMP_WAIT_POLICY', '').upper() == 'ACTIVE'
    if args.modes is None:
        args.modes = list(FLOAT_MODES if args.smoke else MODES)
        if spinning:  # the PyTorch modes alone, as that setting asks for
            args.modes = [m for m in args.modes if m not in PEERS]
            print('OMP_WAIT_POLICY=ACTIVE: the peers (ONNX Runtime, OpenVINO) are left out; '
                  'unset it to measure them', file=sys.stderr)
    peers = [m for m in args.modes if m in PEERS]
    if peers and spinning:
        parser.error(f'OMP_WAIT_POLICY=ACTIVE makes idle PyTorch threads spin through the '
                     f'turns of {", ".join(peers)} and slows them; unset it, or drop the peers '
                     f'from --modes')
    if not args.batch_sizes and args.skip_training:
        parser.error('nothing to measure: --batch-sizes is empty and --skip-training is set')
    out = output_file(parser, args.json, '--json')  # the benchmark reads no files
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kwargs = dict(variants=args.model, batch_sizes=args.batch_sizes,
                  train_batch=args.train_batch, image_size=args.image_size, rounds=args.rounds,
                  warmup=args.warmup, compile=args.compile, modes=args.modes,
                  skip_training=args.skip_training, keep_freed_memory=args.keep_freed_memory,
                  calibration=args.calibration)
    if args.smoke:
        kwargs.update(variants=['conformer_nano_patch4'], batch_sizes=[1, 2], train_batch=2,
                      image_size=32, rounds=2, warmup=1, gemm_size=256,
                      model_kwargs=dict(num_classes=10))
    try:
        result = run(**kwargs)
    except ValueError as e:  # a model name, an image size the model cannot take, ...
        parser.error(str(e))
    print(format_table(result))
    out.write_text(json.dumps(result, indent=1))
    print(f'wrote {out}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
