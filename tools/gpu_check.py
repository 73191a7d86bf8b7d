"""What to run first on a new GPU machine: the GPU paths CPU tests cannot prove.

1. kernels: every Triton op against its PyTorch reference computed in fp64, at Conformer's
   shapes, forward and (attention) backward, in fp16, bf16 and fp32 (with TF32 and IEEE dots);
2. train: a short bf16 training of the quickstart model on Fashion-MNIST through the trainer
   (Hydra compose + ``conformer.engine.trainer.train``); the loss must fall;
3. nccl: a world-size-1 NCCL process group through the trainer's collectives;
4. bench: ``tools/bench_kernels.py`` on Conformer's shapes, against its speed targets.

Writes one JSON report, prints a table, exits 0 if every check passes, 1 if one fails and 2
when no CUDA GPU is visible. About five minutes on one H100.

    python tools/gpu_check.py --out gpu_check.json
"""

import argparse
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent

# Largest |kernel - fp64 reference| allowed, relative to the reference's largest magnitude.
# 16-bit: inputs and outputs are rounded (fp16 2**-11, bf16 2**-8), accumulation is fp32.
# TF32 dots round their inputs to 10 mantissa bits, like fp16; IEEE fp32 differs from fp64 by
# summation order only.
TOLERANCE = {'float16': 5e-3, 'bfloat16': 4e-2, 'tf32': 5e-3, 'ieee': 1e-5}
TRAIN_STEPS = 300
BATCH = 64
DEVICE = 'cuda'


def precisions():
    """(dtype, precision label, allow TF32) for every way the kernels compute."""
    return [(torch.float16, 'float16', False), (torch.bfloat16, 'bfloat16', False),
            (torch.float32, 'tf32', True), (torch.float32, 'ieee', False)]


def relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def attention_errors(dtype):
    from conformer.kernels import attention
    from conformer.kernels.compile_check import TOKENS
    from conformer.kernels.flash_attention import attention_reference

    errors = {}
    for heads, D in ((6, 64), (9, 64)):  # Conformer-Ti/S, Conformer-B
        qkv = torch.randn(BATCH, TOKENS, 3, heads, D, device=DEVICE, dtype=dtype)
        # leaves that stay strided views of the packed qkv, as in the model
        q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
        out = attention(q, k, v, backend='triton')
        grad = torch.randn_like(out)
        out.backward(grad)
        ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want = attention_reference(*ref)
        want.backward(grad.double())
        for name, got, expected in zip(('out', 'dq', 'dk', 'dv'), (out, q.grad, k.grad, v.grad),
                                       (want, *(t.grad for t in ref))):
            errors[f'attention H{heads} {name}'] = relative_error(got, expected.detach())
    return errors


def conv_errors(dtype):
    from conformer.kernels import conv_bn_act
    from conformer.kernels.compile_check import CONV_CASES
    from conformer.kernels.conv import conv_bn_act_reference

    errors = {}
    for name, C_in, C_out, size, k, stride, residual, relu in CONV_CASES:
        x = torch.randn(BATCH, C_in, size, size, device=DEVICE, dtype=dtype)
        weight = torch.randn(C_out, C_in, k, k, device=DEVICE, dtype=dtype) / (C_in * k * k)**0.5
        scale, shift = torch.rand(C_out, device=DEVICE) + 0.5, torch.randn(C_out, device=DEVICE)
        size_out = (size - 1) // stride + 1
        res = torch.randn(BATCH, C_out, size_out, size_out, device=DEVICE, dtype=dtype) \
            if residual else None
        out = conv_bn_act(x, weight, scale, shift, stride, res, relu, backend='triton')
        want = conv_bn_act_reference(x.double(), weight.double(), scale.double(), shift.double(),
                                     stride, None if res is None else res.double(), relu)
        errors[f'conv_bn_act {name}'] = relative_error(out, want)
    return errors


def _fp64(args):
    return [a.double() if torch.is_tensor(a) else a for a in args]


def fcu_errors(dtype):
    from conformer.kernels import fcu_down, fcu_up
    from conformer.kernels.compile_check import FCU_EMBED_DIMS
    from conformer.kernels.fcu import fcu_down_reference, fcu_up_reference

    errors = {}
    new = dict(device=DEVICE, dtype=dtype)
    for C_tok in FCU_EMBED_DIMS:
        for size, C_map in ((56, 64), (28, 128), (14, 256)):
            x = torch.randn(BATCH, C_map, size, size, **new)
            down = (x, torch.randn(C_tok, C_map, 1, 1, **new) / C_map**0.5,
                    torch.randn(C_tok, **new), (14, 14), torch.rand(C_tok, **new) + 0.5,
                    torch.randn(C_tok, **new), 1e-6)
            up = (torch.randn(BATCH, 196, C_tok, **new), (14, 14),
                  torch.randn(C_map, C_tok, 1, 1, **new) / C_tok**0.5, torch.randn(C_map, **new),
                  torch.rand(C_map, device=DEVICE) + 0.5, torch.randn(C_map, device=DEVICE),
                  (size, size), x)
            case = f'{size}x{size}x{C_map} <-> 14x14x{C_tok}'
            errors[f'fcu_down {case}'] = relative_error(fcu_down(*down, backend='triton'),
                                                        fcu_down_reference(*_fp64(down)))
            errors[f'fcu_up {case}'] = relative_error(fcu_up(*up, backend='triton'),
                                                      fcu_up_reference(*_fp64(up)))
    return errors


def check_kernels():
    rows, passed = [], True
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for dtype, label, tf32 in precisions():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            torch.manual_seed(0)
            for family in (attention_errors, conv_errors, fcu_errors):
                for case, error in family(dtype).items():
                    ok = error <= TOLERANCE[label]
                    passed &= ok
                    rows.append(dict(case=case, precision=label, error=error,
                                     tolerance=TOLERANCE[label], passed=ok))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return passed, dict(cases=rows, failed=[r for r in rows if not r['passed']])


def check_training():
    from hydra import compose, initialize_config_dir

    from conformer.engine.cli import config_dir
    from conformer.engine.trainer import train

    with tempfile.TemporaryDirectory() as run_dir:
        with initialize_config_dir(config_dir(), version_base='1.3'):
            cfg = compose('train', overrides=[
                'experiment=quickstart', 'trainer.device=cuda', 'trainer.amp=bf16',
                f'trainer.max_steps={TRAIN_STEPS}', 'logging.every_steps=25',
                'logging.progress=false', 'logging.plot=false'])
        result = train(cfg, Path(run_dir))
        records = [json.loads(line) for line in (Path(run_dir) / 'metrics.jsonl').open()]
    losses = [r['loss'] for r in records if r['kind'] == 'train']
    passed = len(losses) >= 2 and all(map(math.isfinite, losses)) and losses[-1] < 0.7 * losses[0]
    return passed, dict(losses=losses, result=result,
                        rule='the last logged loss is below 0.7x the first')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def check_nccl():
    import torch.distributed as dist

    from conformer.engine.distributed import all_sum, barrier, collective_device

    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0,
                            world_size=1, device_id=torch.device('cuda', 0))
    try:
        values = torch.arange(4, dtype=torch.float64)  # on the CPU, as the trainer's metrics
        summed = all_sum(values)
        barrier()
        device = collective_device()
    finally:
        dist.destroy_process_group()
    passed = summed.device == values.device and torch.equal(summed, values)
    return passed, dict(collective_device=str(device), summed=summed.tolist())


def check_bench():
    """The kernel benchmark (bf16, batch 64) against the targets it states."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'bench.json'
        subprocess.run([sys.executable, str(TOOLS / 'bench_kernels.py'), '--out', str(out)],
                       check=True)
        report = json.loads(out.read_text())
    rows = [r for r in report['results'] if r['impl'] == 'triton']

    def geomean_speedup(suite, prefix=''):
        xs = [r['speedup'] for r in rows if r['suite'] == suite and r['case'].startswith(prefix)]
        return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None

    targets = {'attention': (geomean_speedup('attention', 'fwd '), 1.0),
               'conv': (geomean_speedup('conv'), 1.2)}
    met = {name: value is not None and value >= goal for name, (value, goal) in targets.items()}
    return all(met.values()), dict(speedups={k: v for k, (v, _) in targets.items()}, met=met,
                                   targets=report['targets'], device=report['device'])


CHECKS = {'kernels': check_kernels, 'train': check_training, 'nccl': check_nccl,
          'bench': check_bench}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='gpu_check.json', help='where to write the JSON report')
    parser.add_argument('--checks', nargs='+', default=list(CHECKS), choices=list(CHECKS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print('gpu_check: no CUDA GPU is visible; run it on a machine with one', file=sys.stderr)
        return 2
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, checks={})
    for name in args.checks:
        start = time.perf_counter()
        try:
            passed, detail = CHECKS[name]()
        except Exception:  # a crash is this check's failure; the others still run
            passed, detail = False, dict(error=traceback.format_exc())
        report['checks'][name] = dict(passed=passed, seconds=time.perf_counter() - start,
                                      detail=detail)
    print(f"{report['device']}, torch {report['torch']}")
    for name, check in report['checks'].items():
        print(f"{name:<8} {'PASS' if check['passed'] else 'FAIL'} {check['seconds']:>7.1f} s")
    for row in report['checks'].get('kernels', {}).get('detail', {}).get('failed', []):
        print(f"  {row['case']} {row['precision']}: error {row['error']:.1e} > {row['tolerance']}")
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + '\n')
    print(f'wrote {args.out}')
    return 0 if all(check['passed'] for check in report['checks'].values()) else 1


if __name__ == '__main__':
    sys.exit(main())
