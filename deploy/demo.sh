#!/usr/bin/env bash
# ficus's main job, locally, from a fresh clone: starts a MongoDB (secantusd-rs), a Kafka
# broker (Tansu) and a Redis (the cache service's) on loopback, seeds a sample `linechatbot` monolith in the reference shapes,
# provisions the topics, runs `ficus run`, makes live changes, shows what arrived where, and
# moves customers_db to 50% ownership and back with the safe cutover, then runs a progressive
# rollout with short holds, injects an anomaly that rolls the next plan back on its own, shows
# the migration log, and takes the service back to 0% with the emergency move.
#
#   bash deploy/demo.sh            (KEEP=1 leaves everything running afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash .ci/install-servers)"
echo "building ficus (release)..."
cargo build --release --locked --bins --features testkit -q

MONGO_PORT=${MONGO_PORT:-27170}
KAFKA_PORT=${KAFKA_PORT:-19092}
REDIS_PORT=${REDIS_PORT:-16379}
work=$(mktemp -d /tmp/ficus-demo.XXXXXX)
pids=()
cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
  else
    echo "left running (pids ${pids[*]}); data in $work"
  fi
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1; see $work/*.log" >&2
  exit 1
}

mkdir -p "$work/mongo" "$work/kafka" "$work/redis"
"$FICUS_SECANTUSD" --port "$MONGO_PORT" --storage-path "$work/mongo/data" --cache-size 256M >"$work/secantusd.log" 2>&1 &
pids+=($!)
(cd "$work/kafka" && exec "$FICUS_TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine sqlite://tansu.db) >"$work/tansu.log" 2>&1 &
pids+=($!)
"$FICUS_REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$work/redis" \
  >"$work/redis.log" 2>&1 &
pids+=($!)
wait_port "$MONGO_PORT"
wait_port "$KAFKA_PORT"
wait_port "$REDIS_PORT"

export FICUS_SOURCE_URI="mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true"
export FICUS_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
export FICUS_TARGET_URI="$FICUS_SOURCE_URI" FICUS_STORE_URI="$FICUS_SOURCE_URI"
export FICUS_REDIS_URI="redis://127.0.0.1:$REDIS_PORT"
bin=target/release

echo "== seeding the monolith"
"$bin/ficus-demo" seed --count 50
echo "== ficus validate"
"$bin/ficus" validate
echo "== ficus topics apply"
"$bin/ficus" topics apply
echo "== ficus run (snapshot, then streaming); log in $work/ficus.log"
"$bin/ficus" run >"$work/ficus.log" 2>&1 &
ficus_pid=$!
pids+=($ficus_pid)
sleep 3
echo "== live changes in the monolith"
"$bin/ficus-demo" churn --changes 20
sleep 4
echo "== what arrived on Kafka"
"$bin/ficus-demo" peek
echo "== what arrived in the service databases"
"$bin/ficus-demo" targets
echo "== ficus status"
"$bin/ficus" status
echo "== ficus verify, every service (each target equals the transforms applied to the monolith)"
for dir in transforms/*/; do
  service=$(basename "$dir")
  "$bin/ficus" verify --service "$service" || { echo "verify $service failed"; tail -20 "$work/ficus.log"; exit 1; }
done
echo "== safe cutover: customers_db takes over the writes of 50% of its customers..."
"$bin/ficus" cutover --service customers_db --to 50 --dry-run
"$bin/ficus" cutover --service customers_db --to 50 || { echo "cutover to 50% failed"; tail -20 "$work/ficus.log"; exit 1; }
echo "== ...what applications read (GET /cutover serves the same)"
"$bin/ficus" status --json | sed -n '/"cutover"/,$p'
echo "== ...and gives them back (the gradual rollback: the same steps the other way)"
"$bin/ficus" cutover --service customers_db --to 0 || { echo "cutover back to 0% failed"; tail -20 "$work/ficus.log"; exit 1; }
"$bin/ficus" verify --service customers_db || { echo "verify after the rollback failed"; exit 1; }
echo "== a progressive rollout: 10% then 50%, each held while analysis measures every 2 s (short holds for the demo)"
"$bin/ficus" cutover --service customers_db --plan 10,50 --hold 6s --interval 2s || { echo "the plan failed"; tail -20 "$work/ficus.log"; exit 1; }
echo "== on to 100% with a longer hold; a service write the reverse cannot map (a dead letter, critical) rolls it back"
"$bin/ficus" cutover --service customers_db --plan 100 --hold 120s --interval 2s &
plan_pid=$!
for _ in $(seq 1 120); do
  "$bin/ficus" status --json 2>/dev/null | grep -q '"holding": 100' && break
  sleep 1
done
"$bin/ficus-demo" spoil --share 100
if wait "$plan_pid"; then echo "the plan should have rolled back"; exit 1; else echo "the plan rolled back on its own (exit $?)"; fi
echo "== the migration log (also GET /log on the metrics address)"
"$bin/ficus" log --service customers_db --limit 40
echo "== the bad value put right on the service's side, then the emergency move back to 0%: fenced and drained, without the checks before it"
"$bin/ficus-demo" spoil --repair
"$bin/ficus" cutover --service customers_db --to 0 --emergency || { echo "the emergency move failed"; exit 1; }
"$bin/ficus" verify --service customers_db --checks counts,contents || { echo "verify after the emergency move failed"; exit 1; }
echo "== stopping ficus (SIGTERM: drain, checkpoint, exit 0)"
kill -TERM "$ficus_pid"
wait "$ficus_pid" && echo "ficus exited cleanly" || { echo "ficus exited with $?"; tail -20 "$work/ficus.log"; exit 1; }
