#!/usr/bin/env bash
# A three-node dflockd cluster (three processes, and three nodes in one
# process) against a one-node cluster (the same durable, fsync'd log, no
# replication) and a plain single node (in memory), interleaved:
# `dflock bench` (acquire + release pairs) at 1, 10 and 50 workers. Extra
# environment (e.g. TOKIO_WORKER_THREADS=1) reaches every dflockd.
# Usage: scripts/bench-cluster.sh [rounds] [seconds]   (release build first:
#   cargo build --profile dist -p dflockd-server --bin dflockd --example failover_bench
#   cargo build --profile dist -p dflockd-cli)
set -euo pipefail
rounds=${1:-2}
seconds=${2:-4}
bin=$(cd "$(dirname "$0")/.." && pwd)/target/dist
work=$(mktemp -d)
trap 'pkill -f "$bin/dflockd" || true; rm -rf "$work"' EXIT
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
peers="1=127.0.0.1:27001@127.0.0.1:26388,2=127.0.0.1:27002@127.0.0.1:26389,3=127.0.0.1:27003@127.0.0.1:26390"
served() { "$bin/dflock" --servers "$1" stats >/dev/null 2>&1; }
for round in $(seq 1 "$rounds"); do
  rm -rf "$work"/n*
  for i in 1 2 3; do
    DFLOCKD_LOG=warn DFLOCKD_RAFT_AUTH_TOKEN=$secret "$bin/dflockd" --port $((26387 + i)) \
      --max-locks 200000 --raft-dir "$work/n$i" --node-id "$i" --raft-addr "127.0.0.1:2700$i" \
      --cluster-peers "$peers" >"$work/log$i" 2>&1 &
  done
  # The seed forms the cluster after its 2 s grace; wait for a leader.
  for _ in $(seq 1 100); do
    if "$bin/dflock" --servers 127.0.0.1:26388 stats --json 2>/dev/null | grep -q '"role":"leader"'; then break; fi
    sleep 0.1
  done
  leader=""
  for p in 26388 26389 26390; do
    if "$bin/dflock" --servers "127.0.0.1:$p" stats --json 2>/dev/null | grep -q '"role":"leader"'; then
      leader="127.0.0.1:$p"
    fi
  done
  echo "== round $round: cluster of 3, leader $leader"
  "$bin/dflock" --servers "$leader" bench --workloads uncontended --workers 1,10,50 --seconds "$seconds"
  pkill -f "$bin/dflockd"; sleep 0.5
  "$bin/examples/failover_bench" serve $((3 * seconds + 10)) >"$work/inproc" 2>&1 &
  inproc=$!
  for _ in $(seq 1 100); do grep -q leader "$work/inproc" && break; sleep 0.1; done
  echo "== round $round: cluster of 3 in one process, $(cat "$work/inproc")"
  "$bin/dflock" --servers "$(awk '/leader/{print $2}' "$work/inproc")" bench --workloads uncontended --workers 1,10,50 --seconds "$seconds"
  kill "$inproc" 2>/dev/null || true; wait "$inproc" 2>/dev/null || true
  DFLOCKD_LOG=warn DFLOCKD_RAFT_AUTH_TOKEN=$secret "$bin/dflockd" --port 26401 \
    --max-locks 200000 --raft-dir "$work/solo" --node-id 1 --raft-addr 127.0.0.1:27010 \
    --cluster-bootstrap >"$work/solo.log" 2>&1 &
  for _ in $(seq 1 100); do
    if "$bin/dflock" --servers 127.0.0.1:26401 stats --json 2>/dev/null | grep -q '"role":"leader"'; then break; fi
    sleep 0.1
  done
  echo "== round $round: one-node cluster (durable log, fsync on)"
  "$bin/dflock" --servers 127.0.0.1:26401 bench --workloads uncontended --workers 1,10,50 --seconds "$seconds"
  pkill -f "$bin/dflockd"; sleep 0.5
  rm -rf "$work/solo"
  DFLOCKD_LOG=warn "$bin/dflockd" --port 26400 --max-locks 200000 >"$work/single.log" 2>&1 &
  for _ in $(seq 1 50); do served 127.0.0.1:26400 && break; sleep 0.1; done
  echo "== round $round: single node (in memory)"
  "$bin/dflock" --servers 127.0.0.1:26400 bench --workloads uncontended --workers 1,10,50 --seconds "$seconds"
  pkill -f "$bin/dflockd"; sleep 0.5
done
