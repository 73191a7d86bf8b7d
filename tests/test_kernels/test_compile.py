"""Every Triton kernel compiles for sm_80 and sm_90 with every config its autotuner can choose.

The interpreter that runs the other kernel tests checks neither loop-carried types, nor int32
offsets, nor shared memory; compiling for a GPU target does. Compiles run in worker processes
without TRITON_INTERPRET (see conformer.kernels.compile_check); fp16 and bf16, head dim 64,
Conformer's shapes. The full matrix is ``tools/bench_kernels.py --compile-only``.
"""

import pytest
import torch

from conformer.kernels import compile_check
from conformer.kernels.backend import fitting_configs, tensor_limit


@pytest.fixture(scope='module')
def results():
    # about 220 compiles, 2-3 s of CPU each (ptxas included): minutes on 2 cores
    return compile_check.run_jobs(compile_check.jobs(archs=(80, 90), dtypes=('float16', 'bfloat16'),
                                                     head_dims=(64,)))


@pytest.mark.slow
def test_every_kernel_and_config_compiles(results):
    kernels = {r['kernel'] for r in results}
    assert kernels == {'_attn_fwd', '_attn_bwd_delta', '_attn_bwd_dkdv', '_attn_bwd_dq',
                       '_conv_bn_act_kernel', '_fcu_down_kernel', '_fcu_up_kernel'}
    failed = [f"{r['case']} sm_{r['arch']} {r['dtype']} {r['config_name']}: {r['error'][:400]}"
              for r in results if r['error'] is not None]
    assert not failed, '\n'.join(failed)


@pytest.mark.slow
def test_every_case_keeps_a_config_that_fits_shared_memory(results):
    kept = compile_check.kept_configs(results)
    assert len(kept) == len({(r['case'], r['arch'], r['dtype']) for r in results})
    assert all(fits for _, fits in kept.values()), [k for k, (_, fits) in kept.items() if not fits]


def test_autotuner_drops_configs_over_the_shared_memory_limit():
    shared = {'big': 240 * 1024, 'small': 100 * 1024, 'medium': 170 * 1024}
    configs = list(shared)
    assert fitting_configs(configs, shared.get, compile_check.SHARED_MEMORY_LIMIT[80]) == ['small']
    assert fitting_configs(configs, shared.get, compile_check.SHARED_MEMORY_LIMIT[90]) == [
        'small', 'medium']
    assert fitting_configs(['big'], shared.get, 64 * 1024) == ['big']  # its launch names the limit


@pytest.mark.slow
def test_offsets_into_a_large_packed_qkv_need_64_bits(results):
    """q is a view of the packed (B, N, 3, H, D) qkv: at B = 9464 (Conformer-S) it has fewer than
    2**31 elements, so the kernels take it, but its last element lies past 2**31. Every kernel
    computes its batch offsets in int64 (an i64 multiply in its Triton IR)."""
    B, N, H, D = 9464, 197, 6, 64
    q = torch.empty(B, N, 3, H, D, device='meta', dtype=torch.float16).permute(2, 0, 3, 1, 4)[0]
    assert tensor_limit(q) is None
    assert sum((size - 1) * stride for size, stride in zip(q.shape, q.stride())) >= 2**31
    wide = {r['kernel']: r['int64_offsets'] for r in results if r['error'] is None}
    assert wide and all(wide.values()), wide


def test_64_bit_multiplies_are_recognised():
    assert compile_check.multiplies_in_64_bits('%7 = arith.muli %5, %6 : tensor<128xi64>\n')
    assert compile_check.multiplies_in_64_bits('%8 = arith.muli %1, %7 : i64 loc(#loc111)\n')
    assert not compile_check.multiplies_in_64_bits('%3 = arith.muli %1, %2 : tensor<64xi32>\n')
    assert not compile_check.multiplies_in_64_bits('%3 = arith.muli %1, %2 : i32 loc(#loc5)')
