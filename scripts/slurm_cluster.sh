#!/usr/bin/env bash
# A real one-node Slurm cluster on loopback, for bulkinfer's tests and CI.
#
#   bash scripts/slurm_cluster.sh start    # install if needed, start, wait until the node is idle
#   bash scripts/slurm_cluster.sh status   # sinfo + squeue; exit 0 if the controller answers
#   bash scripts/slurm_cluster.sh stop     # cancel jobs, stop slurmd, slurmctld (and munged if we started it)
#
# Everything the cluster writes (config, state, spool, logs, pid files) lives in one folder,
# BULKINFER_SLURM_DIR (default /tmp/bulkinfer-slurm); /etc/slurm is never touched. `start` ends by
# printing `export SLURM_CONF=...`: clients (sbatch, squeue, ...) need that variable.
#
# Needs root (it installs Debian packages and runs the daemons as root). Only 127.0.0.1 is used:
# the node address, the controller address, and (through NoInAddrAny/NoCtldInAddrAny) the address
# the daemons bind to, which is what the short hostname resolves to, checked to be loopback first.
set -euo pipefail

STATE_DIR=${BULKINFER_SLURM_DIR:-/tmp/bulkinfer-slurm}
CONF="$STATE_DIR/slurm.conf"
export SLURM_CONF="$CONF"
# Default Slurm ports; they are bound on loopback only.
CTLD_PORT=${BULKINFER_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${BULKINFER_SLURMD_PORT:-6818}
READY_TIMEOUT=${BULKINFER_SLURM_TIMEOUT:-60}
NODE=$(hostname -s)
# Set when this script started munged, so that `stop` leaves a system-wide munged alone.
MUNGE_MARK="$STATE_DIR/munged.started-by-us"

# Set once `start` has launched daemons: a start that fails after that stops them again, so that
# a failed start leaves nothing running (slurmd would otherwise retry its registration forever).
LAUNCHED=0

log() { echo "slurm_cluster: $*" >&2; }

die() {
    if ((LAUNCHED)); then
        cmd_stop >/dev/null 2>&1 || true
    fi
    log "ERROR: $*"
    exit 1
}

# Last lines of the daemon logs, so that a failure says why without anyone opening files.
# The PMIx lines are noise: Debian's slurm loads every MPI plugin and PMIx is not installed.
show_logs() {
    local f
    for f in "$STATE_DIR/slurmd.log" "$STATE_DIR/slurmctld.log"; do
        if [[ -s $f ]]; then
            log "--- last lines of $f"
            grep -vE 'pmix|MPI: Cannot create context' "$f" | tail -n 8 >&2 || true
        fi
    done
}

# Whether a process runs. A daemon that exited stays a zombie until init reaps it, which can
# take seconds in containers, and kill -0 still succeeds on a zombie: read its state instead.
proc_alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

# The pid in a pid file, if that process is alive.
pidfile_pid() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(cat "$1")
    [[ $pid =~ ^[0-9]+$ ]] && proc_alive "$pid" && echo "$pid"
}

pid_alive() {
    pidfile_pid "$1" >/dev/null
}

any_alive() {
    local pid
    for pid in "$@"; do
        proc_alive "$pid" && return 0
    done
    return 1
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && command -v sinfo >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || die "slurm is not installed and installing it needs root"
    log "installing slurm-wlm and munge (Debian packages)"
    # The packages' postinst scripts try to start the services; policy-rc.d stops that on
    # container images, and where it does not, the system daemons would use /etc/slurm, not ours.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
        die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

munge_works() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

ensure_munge() {
    if munge_works; then
        return
    fi
    # Debian's postinst usually makes the key; make one if it did not (readable by munge only).
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 700 /etc/munge
        if ! mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null; then
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    # /run is a tmpfs on most machines, so the socket folder is gone after every boot.
    install -d -o munge -g munge -m 755 /run/munge
    # A munged killed hard leaves its pid file and socket behind and refuses to start over them.
    if [[ -e /run/munge/munged.pid ]] && ! pid_alive /run/munge/munged.pid; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged 9>&- || die "munged did not start (see /var/log/munge/munged.log)"
    touch "$MUNGE_MARK"
    LAUNCHED=1
    for _ in $(seq 1 20); do
        munge_works && return
        sleep 0.25
    done
    die "munged started but a munge/unmunge round trip fails"
}

# The daemons bind to what the hostname resolves to (NoInAddrAny); refuse anything but loopback
# rather than expose a root-run job launcher on a real interface.
check_loopback_hostname() {
    local addr
    addr=$(getent ahostsv4 "$(hostname)" | awk 'NR == 1 {print $1}') || true
    [[ $addr == 127.* ]] ||
        die "hostname $(hostname) resolves to '${addr:-nothing}', not a 127.x address; add \
'127.0.0.1 $(hostname)' to /etc/hosts so that the daemons bind to loopback only"
}

# The machine's processors: nproc alone answers OMP_NUM_THREADS when it is set (a test run
# with OMP_NUM_THREADS=1 made a one-CPU node, on which a job of two tasks waited forever).
cores() {
    env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc
}

write_conf() {
    local cpus mem_total mem real_mem
    cpus=${BULKINFER_SLURM_CPUS:-$(cores)}
    mem_total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # A node that reports less memory than configured is drained ("Low RealMemory"): stay under.
    real_mem=$((mem_total * 95 / 100))
    # Without a default, CR_Core_Memory gives every job the whole node's memory, so only one job
    # (one array task) could run at a time.
    mem=$((real_mem / cpus))
    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool"
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh; rewritten on every start.
ClusterName=bulkinfer
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# Bind to the hostname's address (checked to be 127.x) instead of 0.0.0.0.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
AuthType=auth/munge
# The credential lifetime is also how long a requeued job waits before it may start again
# (22.05 sets its BeginTime to now + cred_expire + 1; default 120 s). 5 is the smallest allowed.
AuthInfo=cred_expire=5
# No cgroups here (containers): track processes through /proc and do no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$mem
# Without accounting there is no sacct: job state is read from squeue/scontrol.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# A node that was down comes back by itself once slurmd registers.
ReturnToService=2
# Short timers so tests are quick: the scheduler and backfill run every second, a killed job
# gets 5 s between SIGTERM and SIGKILL, finished jobs stay visible in squeue for 60 s.
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=5
MinJobAge=60
SlurmdTimeout=60
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # BULKINFER_SLURM_CPUS above nproc overcommits the node: keep slurmd from draining it.
    if ((cpus > $(cores))); then
        echo "SlurmdParameters=config_overrides" >>"$CONF"
    fi
}

controller_answers() {
    [[ -f $CONF ]] && scontrol ping 2>/dev/null | grep -q 'is UP'
}

node_state() {
    # `|| true`: no answer yet is an empty state, not a reason for set -e to end the script.
    sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true
}

start_daemons() {
    log "starting slurmctld and slurmd (state in $STATE_DIR)"
    LAUNCHED=1
    # -c: a throwaway test cluster starts with no jobs left over from an earlier run.
    # 9>&-: the daemons must not inherit the lock that take_lock holds on fd 9.
    slurmctld -f "$CONF" -c 9>&- || { show_logs; die "slurmctld did not start"; }
    slurmd -f "$CONF" 9>&- || { show_logs; die "slurmd did not start"; }
}

# Wait until the node can take jobs; resume it if it registered as down or drained.
wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT)) state resumed=0
    while ((SECONDS < deadline)); do
        # A daemon that died (bad config, port taken) will not come back: say so now.
        if ! pid_alive "$STATE_DIR/slurmctld.pid" || ! pid_alive "$STATE_DIR/slurmd.pid"; then
            sleep 0.5 # the pid file is written just after the fork
            if ! pid_alive "$STATE_DIR/slurmctld.pid" || ! pid_alive "$STATE_DIR/slurmd.pid"; then
                show_logs
                die "slurmctld or slurmd exited during start-up (logs above, in $STATE_DIR)"
            fi
        fi
        state=$(node_state)
        case $state in
        idle | mixed | allocated | completing)
            return 0
            ;;
        down | drained | draining | drain*)
            if ((resumed == 0)); then
                log "node $NODE is $state; resuming it"
                scontrol update nodename="$NODE" state=resume || true
                resumed=1
            fi
            ;;
        esac
        sleep 0.5
    done
    show_logs
    die "node $NODE is not idle after ${READY_TIMEOUT}s (last state: '${state:-no answer}')"
}

# Ports 6817/6818 must be bound to 127.0.0.1 only; stop everything if one is on another address.
check_listeners() {
    local bad
    command -v ss >/dev/null || return 0
    bad=$(ss -Hltn "( sport = :$CTLD_PORT or sport = :$SLURMD_PORT )" |
        awk '{print $4}' | grep -v '^127\.' || true)
    if [[ -n $bad ]]; then
        cmd_stop
        die "a Slurm daemon listens on a non-loopback address: $bad"
    fi
}

cmd_start() {
    install_packages
    mkdir -p "$STATE_DIR"
    ensure_munge
    if controller_answers && pid_alive "$STATE_DIR/slurmd.pid"; then
        log "cluster already running"
        wait_ready
    else
        check_loopback_hostname
        # Half-started leftovers (one daemon dead) are stopped so both start from the same config.
        stop_daemons
        write_conf
        start_daemons
        wait_ready
        check_listeners
        log "cluster up: node $NODE $(node_state), $(grep -o 'CPUs=[0-9]*' "$CONF")"
    fi
    echo "export SLURM_CONF=$CONF"
}

# SIGTERM the daemons named by pid files, all at once, and wait for them to go; SIGKILL after 15 s.
stop_pidfiles() {
    local pidfile pid pids=()
    for pidfile in "$@"; do
        if pid=$(pidfile_pid "$pidfile"); then
            log "stopping $(basename "$pidfile" .pid) (pid $pid)"
            kill "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for _ in $(seq 1 60); do
        any_alive "${pids[@]}" || break
        sleep 0.25
    done
    for pid in "${pids[@]}"; do
        proc_alive "$pid" && { log "pid $pid ignores SIGTERM; killing it"; kill -9 "$pid" 2>/dev/null || true; }
    done
    rm -f "$@"
}

stop_daemons() {
    stop_pidfiles "$STATE_DIR/slurmd.pid" "$STATE_DIR/slurmctld.pid"
}

# Cancel jobs first: slurmd leaves running job steps (slurmstepd) alive when it stops.
cancel_jobs() {
    local jobs
    controller_answers || return 0
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || true
    [[ -n ${jobs// /} ]] || return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 30); do
        [[ -z $(squeue -h -t running,completing -o %A 2>/dev/null) ]] && return 0
        sleep 0.5
    done
    log "some jobs are still ending"
}

cmd_stop() {
    cancel_jobs
    stop_daemons
    if [[ -f $MUNGE_MARK ]]; then
        stop_pidfiles /run/munge/munged.pid
        rm -f "$MUNGE_MARK"
    fi
    log "stopped"
}

cmd_status() {
    if ! controller_answers; then
        echo "slurm_cluster: no controller answers for $CONF"
        return 1
    fi
    sinfo
    squeue
    echo "export SLURM_CONF=$CONF"
}

# One start or stop at a time per state folder (two test runs starting at once would otherwise
# both write the config and race for the ports). The lock is released when the script exits.
take_lock() {
    command -v flock >/dev/null || return 0
    exec 9>"$STATE_DIR.lock"
    flock -w 900 9 || die "another start/stop holds $STATE_DIR.lock"
}

case ${1:-} in
start) take_lock && cmd_start ;;
stop) take_lock && cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status   (state folder: \$BULKINFER_SLURM_DIR, now $STATE_DIR)" >&2
    exit 2
    ;;
esac
