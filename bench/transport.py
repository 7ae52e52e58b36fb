"""Transport at real scale: a >= 1 GB bfloat16 slice to a client and back through a real Flower deployment.

A SuperLink and one SuperNode on 127.0.0.1 (fedtp_flwr/flower_harness.py: Deployment, which also stops every
process it started), and `flwr run` of bench/transport_app: its ServerApp sends a prefix of the real
Llama 3.2 3B world-size-2 slice (>= --min-bytes of random bfloat16 values, encoded by fedtp_flwr.wire) to
the node; the ClientApp decodes it, re-encodes it and sends it back; the ServerApp checks the echo bit for
bit. Everything crosses Flower's real transport: the message is deflated into content-addressed objects
(Arrays cut into 5 MiB chunks) that are pushed to the SuperLink over its API and pulled by the SuperNode
(and the same way back).

Reported: bytes of array data each way and of Flower's serialized objects; round-trip time; the peak RSS
of each process, above its RSS before the slice was built for the ServerApp, per byte sent: the ServerApp
process (flwr-serverapp; it also holds the encoded record until the reply is checked, 1 byte per byte
sent, as a real server holds the encoded slices it sent), the SuperLink (flower-superlink: its object
store) and the SuperNode (flower-supernode); and the peak of the summed RSS of all the deployment's
processes (SuperLink, SuperExec, ServerApp, SuperNode, ClientApp; sampled every 0.25 s).

    python bench/transport.py                   # 1 GB each way, ~1-3 min, ~8-11 GB of memory in all
    python bench/transport.py --min-bytes 2e8   # smaller
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import _common

from fedtp_flwr.server.memory import status_bytes
from fedtp_flwr.testing.flower_harness import Deployment, find_tagged_processes

APP_DIR = _common.BENCH_DIR / "transport_app"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-bytes", type=float, default=1e9, help="array bytes to send (the slice prefix reaches it)")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--pulls", default="flower,fedtp",
                   help="how the ServerApp pulls the echo: flower (Grid.pull_messages), fedtp (fedtp_flwr.server.pull)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    pulls = [x for x in a.pulls.split(",") if x]
    t_start = time.perf_counter()
    total_rss = [0]
    sampling = threading.Event()

    def sample(tag: str):  # RSS of all the deployment's processes together, every 0.25 s
        while not sampling.wait(0.25):
            total_rss.append(sum(status_bytes("VmRSS", pid) or 0 for pid in find_tagged_processes(tag)))

    with Deployment(num_supernodes=1, node_configs=[{"partition-id": 0, "num-partitions": 1}]) as dep:
        sampler = threading.Thread(target=sample, args=(dep.tag,), daemon=True)
        sampler.start()
        by_pull, runs = {}, {}
        for how in pulls:  # one run each, in the same deployment
            result_path = dep.workdir / f"transport-server-{how}.json"
            run = dep.run(APP_DIR, {"min-bytes": int(a.min_bytes), "result-path": str(result_path), "pull": how,
                                    "wire-dtype": "bfloat16", "timeout": float(a.timeout_s)}, timeout_s=a.timeout_s + 60)
            if not run.ok or not result_path.exists():
                print(run.describe(), file=sys.stderr)
                print(dep.supernodes[0].output[-3000:], file=sys.stderr)
                raise SystemExit(f"the Flower run (pull {how}) did not complete")
            by_pull[how], runs[how] = json.loads(result_path.read_text()), run
        processes = {}
        for pid, cmd in find_tagged_processes(dep.tag).items():
            processes[str(pid)] = {"peak_rss": status_bytes("VmHWM", pid), "rss": status_bytes("VmRSS", pid),
                                   "cmd": _common.portable_command(cmd)[:200]}
        superlink_peak = status_bytes("VmHWM", dep.superlink.pid)
        supernode_peak = status_bytes("VmHWM", dep.supernodes[0].pid)
        s, run = by_pull[pulls[0]], runs[pulls[0]]
        sampling.set()
        sampler.join()
    together = max(total_rss)
    wall = time.perf_counter() - t_start

    sent = s["payload_bytes"]
    server_peak = s["peak_final"] - s["rss_start"]
    flower_part = s["peak_after_round_trip"] - s["rss_before_send"]
    rows = [
        ["array bytes sent (server -> client)", f"{sent:,}"],
        ["array bytes received (client -> server)", f"{s['echo_payload_bytes']:,}"],
        ["tensors", s["n_tensors"]],
        ["Flower objects, server -> client (count / bytes)", f"{s['down_objects']:,} / {s['down_object_bytes']:,}"],
        ["Flower objects, client -> server (count / bytes)", f"{s['up_objects']:,} / {s['up_object_bytes']:,}"],
        ["serialized / array bytes", f"{s['down_object_bytes'] / sent:.6f}"],
        ["echo identical bit for bit", s["echo_exact"]],
        ["build + encode (s)", f"{s['build_seconds']:.1f} + {s['encode_seconds']:.1f}"],
        ["round trip through Flower (s)", f"{s['round_trip_seconds']:.1f}"],
        ["throughput, both directions (MB/s)",
         f"{(sent + s['echo_payload_bytes']) / s['round_trip_seconds'] / 1e6:.0f}"],
        ["ClientApp decode + re-encode (s)", f"{s['client']['decode-encode-seconds']:.1f}"],
        ["ServerApp peak RSS above start (GB)", f"{server_peak / 1e9:.2f}"],
        ["  per byte sent", f"{server_peak / sent:.2f}"],
        ["  of which the encoded record before sending (per byte)",
         f"{(s['rss_before_send'] - s['rss_start']) / sent:.2f}"],
        ["  of which the round trip added (per byte)", f"{flower_part / sent:.2f}"],
        ["SuperLink peak RSS (GB, per byte sent)",
         f"{superlink_peak / 1e9:.2f} ({superlink_peak / sent:.2f})" if superlink_peak else "-"],
        ["SuperNode peak RSS (GB, per byte sent)",
         f"{supernode_peak / 1e9:.2f} ({supernode_peak / sent:.2f})" if supernode_peak else "-"],
        ["ClientApp peak RSS before its reply is serialized (GB)", f"{s['client']['peak-rss-before-reply'] / 1e9:.2f}"],
        ["all Flower processes together, peak of summed RSS (GB, per byte sent)",
         f"{together / 1e9:.2f} ({together / sent:.2f})"],
        ["whole benchmark, incl. start and stop (s)", f"{wall:.0f}"],
    ]
    pull_rows = []
    for how, r in by_pull.items():  # the two halves of the round trip, each above the RSS it started from
        pull_rows.append([how, f"{(r['peak_push'] - r['rss_before_send']) / sent:.2f}",
                          f"{(r['peak_pull'] - r['rss_after_push']) / sent:.2f}", f"{r['round_trip_seconds']:.1f}",
                          r["echo_exact"]])
    _common.table(["measure", "value"], rows,
                  title=f"One round trip of a {sent / 1e9:.2f} GB bfloat16 slice (prefix of the 3B W=2 slice) "
                        "through a SuperLink and a SuperNode on loopback (Flower 1.42, insecure gRPC)")
    _common.table(["pull", "push: peak RSS added per byte", "pull: peak RSS added per byte", "round trip (s)",
                   "echo exact"], pull_rows,
                  title="ServerApp memory per half of the round trip, by how the reply is pulled "
                        "(pull: Flower's Grid.pull_messages, or fedtp_flwr.server.pull, which assembles each array in place)")
    result = {"server_app": s, "superlink_peak_rss": superlink_peak, "supernode_peak_rss": supernode_peak,
              "processes_at_end": processes, "all_processes_rss_peak": together, "run_status": run.status,
              "run_seconds": run.duration_s,
              "wall_seconds": wall, "server_peak_rss_per_byte_sent": server_peak / sent,
              "round_trip_added_rss_per_byte_sent": flower_part / sent, "echo_exact": s["echo_exact"],
              "by_pull": {how: {"push_added_rss_per_byte": (r["peak_push"] - r["rss_before_send"]) / sent,
                                "pull_added_rss_per_byte": (r["peak_pull"] - r["rss_after_push"]) / sent,
                                "round_trip_seconds": r["round_trip_seconds"], "echo_exact": r["echo_exact"],
                                "server_app": r} for how, r in by_pull.items()}}
    _common.write_results("transport", result, a.out)
    return result


if __name__ == "__main__":
    main()
