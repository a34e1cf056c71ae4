"""Run by test_exits under torchrun: argv OUT SCRIPT ARGS... runs SCRIPT (one of this project's
commands) as __main__ with ARGS and writes OUT/rankN.json as its process group is destroyed: the
threads the process still runs then, and whether anything still holds the group. A group held
past destroy_process_group keeps gloo's threads and sockets until the interpreter shuts down,
where they end in no set order while the other processes exit too."""

import atexit
import json
import os
import runpy
import sys
import weakref

import torch.distributed as dist

out, script, *args = sys.argv[1:]
groups = []
init, destroy = dist.init_process_group, dist.destroy_process_group


def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))


def init_and_keep_a_weak_reference(*a, **k):
    init(*a, **k)
    groups.append(weakref.ref(dist.group.WORLD))


def destroy_and_look(*a, **k):
    destroy(*a, **k)
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"threads": threads(), "held": [ref() is not None for ref in groups]}, f)


def shutting_down():
    open(os.path.join(out, f"rank{os.environ['RANK']}.atexit"), "w").close()


atexit.register(shutting_down)
dist.init_process_group, dist.destroy_process_group = init_and_keep_a_weak_reference, destroy_and_look
sys.argv = [script, *args]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
