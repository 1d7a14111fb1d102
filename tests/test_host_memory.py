import subprocess
import sys

# Steps that allocate, fill and free tensors the sizes of a MoE-200M layer's expert gradients (96, 48 and
# 16 MiB); prints the page faults of the last three of ten steps (the heap settles within the first five).
STEPS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from litmoe.training.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grads = [torch.empty(mib << 18).fill_(1.0) for mib in (96, 48, 16)]
    del grads
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(sum([step() for _ in range(10)][7:]))
"""


def faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(result.stdout)


def test_freed_memory_is_reused_without_page_faults():
    assert faults("system") > 3 * 30_000  # 160 MiB = 40,960 pages of 4 KiB faulted in again every step
    assert faults("keep") < 1_000
