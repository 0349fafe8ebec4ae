"""A model of the dispatcher's batch rule on the split benchmark's suite, to
choose how far to trust one measurement (see BENCHMARKS.md, "One commit split
across runners"). Not Kiln itself: a simulation of its rule.

Runners of one slot take batches as they free up. A batch is the runner's
share of the work left (pending and running, by estimate) divided by the
divisor, filled from the front (longest) and then from the back (shortest),
at least one file and 500 ms; once a slot's even share of what is left is at
most TAIL (1.5 s), that share whole, not divided. Each batch costs OVERHEAD seconds and each file
PER_FILE more; real durations are the estimates times lognormal noise.

    python3 crates/kiln/benches/split_model.py
"""

import heapq
import math
import random

SUITE = [2.0] * 4 + [0.2] * 36  # seconds, as in benches/split.rs
OVERHEAD, PER_FILE, MIN_BATCH, TAIL = 0.15, 0.02, 0.5, 1.5


def makespan(divisor, runners, sigma, seed, tail=TAIL):
    rng = random.Random(seed)
    real = [d * math.exp(rng.gauss(0, sigma)) for d in SUITE]
    pending = sorted(range(len(SUITE)), key=lambda i: -SUITE[i])
    free = [(0.0, r) for r in range(runners)]
    running = {}  # runner -> [(file, when it ends)]
    end = 0.0
    while pending:
        now, r = heapq.heappop(free)
        running.pop(r, None)
        left = sum(SUITE[f] for b in running.values() for f, t in b if t > now)
        even = (sum(SUITE[i] for i in pending) + left) / runners
        target = max(even if even <= tail else even / divisor, MIN_BATCH)
        batch, worth = [], 0.0
        while pending and (not batch or worth + SUITE[pending[0]] <= target + 1e-9):
            worth += SUITE[pending[0]]
            batch.append(pending.pop(0))
        while len(pending) > 0 and worth + SUITE[pending[-1]] <= target + 1e-9:
            worth += SUITE[pending[-1]]
            batch.append(pending.pop())
        t, ends = now + OVERHEAD, []
        for f in batch:
            t += real[f] + PER_FILE
            ends.append((f, t))
        running[r] = ends
        heapq.heappush(free, (t, r))
        end = max(end, t)
    return end / max(sum(real) / runners, max(real))


if __name__ == "__main__":
    for sigma in (0.0, 0.1, 0.25):
        for divisor in (1.0, 1.3, 1.5, 2.0):
            for tail in (0.0, TAIL):
                runs = [makespan(divisor, 4, sigma, seed, tail) for seed in range(300)]
                print(f"noise {sigma:.2f}, divisor {divisor:.1f}, tail {tail:.1f} s: makespan / ideal "
                      f"mean {sum(runs) / len(runs):.3f}, worst {max(runs):.3f}")
