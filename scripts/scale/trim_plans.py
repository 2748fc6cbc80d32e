#!/usr/bin/env python3
"""Trims the warm pass of scripts/scale.sh's explain output (target/scale/explain.txt) to the plan
nodes, conditions and buffers of each statement, with each call's time from the timing pass."""
import re, sys
text = open(sys.argv[1]).read().split("#### warm pass", 1)[1].split("#### timing pass")[0]
timing = open(sys.argv[1]).read().split("#### timing pass", 1)[1]
times = {}
for section in timing.split("#### ")[1:]:
    title, body = section.split("\n", 1)
    t = re.findall(r"Execution Time: ([0-9.]+) ms", body)
    if t: times[title.strip()] = max(map(float, t))
for section in text.split("#### ")[1:]:
    title, body = section.split("\n", 1)
    if title.startswith("end of pass"): continue
    print(f"-- {title.strip()}: {times.get(title.strip(), 0):.3f} ms")
    entries = re.split(r"psql:[^\n]*LOG:  duration: ", body)[1:]
    for e in entries[:-1]:
        dur, rest = e.split(" ms", 1)
        q = re.search(r"Query Text:\s*(.*?)\n(?=\S)", rest, re.S)
        qt = " ".join(q.group(1).split()) if q else ""
        if qt.startswith("select jsonb_build_object(") or qt.startswith("SELECT pg_catalog.set_config"): continue
        plan = rest[q.end():] if q else rest
        keep = []
        for l in plan.split("\n"):
            if not l.strip() or l.startswith("psql") or l.startswith("(") or l.startswith("-") : continue
            if re.match(r"^\s*(Filter|Index Cond|Buffers|Conflict|Tuples|Rows Removed|Heap Fetches|Sort Key|Group Key|Hash Cond|Recheck|InitPlan|SubPlan|Batches|Buckets|Memory|Sort Method|Join Filter|Output|Planning|Execution|Trigger|Cache|Hits|Key|CTE )", l):
                if not re.match(r"^\s*(Index Cond|Filter|Buffers)", l): continue
            if re.match(r"^\s*[a-z_ ]+\s*$", l) or "|" in l: continue
            keep.append(re.sub(r"\(cost=[^)]*\) ", "", l))
        print(f"   {dur.strip()} ms  {qt[:110]}")
        for l in keep[:16]:
            print("      " + l[:150])
