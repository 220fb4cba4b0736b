#!/usr/bin/env bash
# A private single-node SLURM for tests: Debian's slurmctld, slurmd, slurm-client and munge.
#
#   slurm/testing/local_slurm.sh install      apt-get the packages (root and apt needed; no-op when present)
#   slurm/testing/local_slurm.sh start DIR [NODES]
#                                             write DIR/slurm.conf, start munged, slurmctld and slurmd; wait
#                                             until idle. One node named localhost, or NODES nodes (localhost,
#                                             localhost2, ...: one slurmd each on this machine, CPUs split)
#   slurm/testing/local_slurm.sh stop DIR     cancel the cluster's jobs, stop the daemons by their PIDs
#
# Everything (config, munge key and socket, state, spool, logs, PID files) lives in DIR, and the
# daemons listen on free ports picked at start, so the cluster touches nothing system-wide and two
# test sessions do not meet. Point clients at it with SLURM_CONF=DIR/slurm.conf. No systemd is used:
# munged runs as the munge user, `slurmctld -i` and `slurmd -N localhost` are started directly.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
BINARIES=(slurmctld slurmd sbatch squeue sinfo scontrol scancel munged mungekey)

die() { echo "local_slurm: $*" >&2; exit "${2:-1}"; }
log() { echo "local_slurm: $*" >&2; }

installed() {
    local binary
    for binary in "${BINARIES[@]}"; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$binary" >/dev/null 2>&1 || return 1
    done
}

install() {
    if installed; then log "already installed: $(PATH="$PATH:/usr/sbin" slurmctld -V)"; return 0; fi
    [ "$(id -u)" -eq 0 ] || die "installing needs root (apt-get); run as root or install ${PACKAGES[*]} yourself" 3
    command -v apt-get >/dev/null || die "apt-get not found: this installer targets Debian/Ubuntu" 3
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed (no network or no package mirror)" 3
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null || die "apt-get install ${PACKAGES[*]} failed" 3
    installed || die "packages installed but ${BINARIES[*]} not all found" 3
    log "installed: $(PATH="$PATH:/usr/sbin" slurmctld -V)"
}

free_ports() {  # COUNT [EXCLUDED...]: COUNT distinct free ports, none of EXCLUDED, all held until all are
    # chosen (one at a time, the kernel can hand the port it just released out again: two Ray
    # components once got the same port and `ray start` refused it)
    python3 -c 'import socket, sys
count, excluded, held = int(sys.argv[1]), {int(p) for p in sys.argv[2:]}, []
ports = []
while len(ports) < count:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); held.append(s)
    port = s.getsockname()[1]
    if port not in excluded and port not in ports:
        ports.append(port)
print(*ports)' "$@"
}

node_name() { if [ "$2" = 1 ]; then echo localhost; else echo "node$1"; fi; }  # node_name INDEX COUNT

write_config() {
    local dir=$1 nodes=$2 cpus memory_mb real_memory ctld_port node node_lines="" node_names=""
    cpus=$(( $(nproc) / nodes )); [ "$cpus" -ge 1 ] || cpus=1
    memory_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    real_memory=$((memory_mb * 3 / 4 / nodes))
    local ports
    read -r -a ports < <(free_ports $((nodes + 1)))  # slurmctld's, then one per slurmd: all distinct
    ctld_port=${ports[0]}
    for node in $(seq 1 "$nodes"); do
        # Every slurmd of this machine listens on its own free port.
        node_lines+="NodeName=$(node_name "$node" "$nodes") NodeHostname=localhost NodeAddr=127.0.0.1 Port=${ports[$node]} CPUs=$cpus RealMemory=$real_memory State=UNKNOWN"$'\n'
        node_names+="${node_names:+,}$(node_name "$node" "$nodes")"
    done
    # DefMemPerCPU is a quarter of the node per CPU on a node of 2+ CPUs, so two one-CPU jobs
    # (or one job per CPU) fit side by side without asking for memory.
    cat >"$dir/slurm.conf" <<CONF
ClusterName=hpcdyntest
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Schedule pending jobs every second or two, not every minute: tests wait on them.
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((real_memory / (cpus * 2 > 2 ? cpus * 2 : 2)))
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
${node_lines}PartitionName=debug Nodes=$node_names Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    local dir=$1
    mkdir -p "$dir/munge"
    chmod 0755 "$dir"
    setpriv --reuid=munge --regid=munge --clear-groups test -x "$dir/munge" ||
        die "the munge user cannot reach $dir (a parent directory is private); use a directory such as /tmp/NAME"
    mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null
    chown -R munge:munge "$dir/munge"
    chmod 0755 "$dir/munge"  # clients need to reach the socket; the key itself stays 0600
    chmod 0600 "$dir/munge/munge.key"
    # munged refuses a socket directory writable by others and daemonises itself; its PID file is ours.
    setpriv --reuid=munge --regid=munge --clear-groups munged \
        --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    cp "$dir/munge/munged.pid" "$dir/run/munged.pid"
}

wait_idle() {
    local dir=$1 state=""
    for _ in $(seq 1 120); do
        state=$(SLURM_CONF="$dir/slurm.conf" sinfo --noheader --format=%t 2>/dev/null || true)
        [ "$state" = "idle" ] && return 0
        sleep 0.5
    done
    die "nodes not idle after 60 s (state '${state}'); see the logs in $dir/log"
}

start() {
    local dir=${1:?usage: local_slurm.sh start DIR [NODES]} nodes=${2:-1} node
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer, got '$nodes'" 2
    installed || die "SLURM is not installed; run: $0 install" 3
    [ "$(id -u)" -eq 0 ] || die "slurmd must run as root to start jobs" 3
    export PATH="$PATH:/usr/sbin:/sbin"
    mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
    [ ! -e "$dir/run/slurmctld.pid" ] || die "$dir already holds a cluster; stop it first"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
    write_config "$dir" "$nodes"
    start_munge "$dir"
    slurmctld -f "$dir/slurm.conf" -i
    for node in $(seq 1 "$nodes"); do slurmd -f "$dir/slurm.conf" -N "$(node_name "$node" "$nodes")"; done
    wait_idle "$dir"
    log "up: export SLURM_CONF=$dir/slurm.conf"
}

stop_pid() {
    local name=$1 file=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$file"
}

stop() {
    local dir=${1:?usage: local_slurm.sh stop DIR} jobs file
    export PATH="$PATH:/usr/sbin:/sbin" SLURM_CONF="$dir/slurm.conf"
    if [ -f "$dir/run/slurmctld.pid" ]; then
        # Only this private cluster's jobs: their slurmstepd would outlive slurmd otherwise.
        jobs=$(squeue --noheader --format=%i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 60); do
                [ -z "$(squeue --noheader --format=%i 2>/dev/null || true)" ] && break
                sleep 0.5
            done
        fi
    fi
    for file in "$dir"/run/slurmd-*.pid; do stop_pid slurmd "$file"; done
    stop_pid slurmctld "$dir/run/slurmctld.pid"
    stop_pid munged "$dir/run/munged.pid"
}

case "${1:-}" in
    install) install ;;
    start) start "${2:-}" "${3:-1}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 install | start DIR [NODES] | stop DIR" 2 ;;
esac
