# Sourced by the CPU experiments (scripts/extend_experiment.sh, prune_demo.sh, distill_demo.sh): independent runs go
# to JOBS background lanes (default 2, one per core), each with THREADS torch threads (default 1). On a small CPU two
# single-threaded runs side by side beat one run on two threads, and far more so on a machine other jobs share.
#   lane NAME CMD...   run CMD once a lane is free; its output goes to $LOGS/NAME.log
#   lanes_wait         wait for every lane; a failed run stops the script with its log's last lines
#   stage TEXT         print a numbered stage with the minutes since the start
# Set LOGS before the first lane.
export OMP_NUM_THREADS=${THREADS:-1}
JOBS=${JOBS:-2}
START_SECONDS=$SECONDS
declare -A LANE_NAME=()

stage() { printf '== [%5.1f min] %s\n' "$(awk "BEGIN {print ($SECONDS - $START_SECONDS) / 60}")" "$*"; }

lanes_fail() {
    local pid=$1 name=${LANE_NAME[$1]}
    echo "failed: $name (log: $LOGS/$name.log)" >&2
    tail -n 5 "$LOGS/$name.log" >&2
    local others
    others=$(jobs -rp)
    [ -z "$others" ] || kill $others 2>/dev/null || true
    exit 1
}

lane() {
    local name=$1
    shift
    mkdir -p "$LOGS"
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    "$@" > "$LOGS/$name.log" 2>&1 &
    LANE_NAME[$!]=$name
}

lanes_wait() {
    local pid
    for pid in "${!LANE_NAME[@]}"; do
        wait "$pid" || lanes_fail "$pid"
        unset "LANE_NAME[$pid]"
    done
}
