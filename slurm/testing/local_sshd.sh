#!/usr/bin/env bash
# A private SSH "node" for testing `ray up` / `ray submit` / `ray exec` / `ray down` (Ray's `local`
# provider) on this machine: Debian's openssh-server, rsync and netcat-openbsd.
#
#   slurm/testing/local_sshd.sh install      apt-get the packages (root and apt needed; no-op when present)
#   slurm/testing/local_sshd.sh start DIR [VENV]
#                                            create the throw-away user, keys and an sshd on a free port of
#                                            127.0.0.1 and 127.0.0.2; write DIR/cluster.yaml (head 127.0.0.1,
#                                            one worker 127.0.0.2) for the project's virtual environment VENV
#                                            (default: .venv of this repository)
#   slurm/testing/local_sshd.sh stop DIR     stop sshd by its PID, end what is left of the throw-away user's
#                                            processes, remove the user's files of this DIR
#
# Ray's `ray down` always runs a bare `ray stop` on the head, which kills every Ray process of the SSH
# user on the host (here: the head and the worker, both this machine). The node's user is therefore
# a dedicated throw-away unix user ($HPCDYN_SSH_USER, default hpcdyn-raynode, created if absent,
# password '*': no password login, yet not locked), never the user that runs `ray up` or the other
# tests; an existing user is used only if this script made it (its comment field says so), since
# start resets its login files. Only one DIR may use that user at a time (start refuses while the
# user has processes).
#
# Besides the user's ~/.ssh/authorized_keys-<DIR's name> and ~/.ssh/config and the user's Ray temp dir
# (below), everything lives in DIR: sshd_config, a throw-away host key, a throw-away user key (id_ed25519,
# what `ray up` logs in with), sshd's PID file and log, the cluster's auth token (auth_token, mode 600,
# copied to the node's ~/.ray/auth_token by the YAML's file_mounts), the YAML, and, where the user
# cannot run VENV's interpreter (e.g. a pyenv python under root's private home), a small virtual
# environment DIR/venv that the user can run: a python of the same minor version (the venv's own base
# interpreter, or python3.X on the system PATH) whose site-packages imports VENV's site-packages, and
# VENV's console scripts (ray, hpcdyn, ...) with their shebang pointed at it. The user's Ray temp dir
# ($RAY_TMPDIR) is a short directory /tmp/hrnXXXXXX owned by the user (Ray's socket paths must fit 107
# characters, and /tmp/ray may belong to root), named in DIR/ray_tmpdir.
#
# sshd runs directly (no systemd; /run/sshd is created if missing), without PAM, accepts only the
# throw-away user with the key of DIR, and listens on 127.0.0.1 and 127.0.0.2 (every 127/8 address
# is this machine). Ray has no SSH port setting: the YAML reaches the port with
# `auth.ssh_proxy_command: nc %h PORT`, which Ray leaves out of the copy of the YAML it gives the head,
# so the user's ~/.ssh/config names the port too (for the head's autoscaler logging in to the worker).
#
# The YAML is slurm/ray-cluster-local.yaml with what one machine needs: free ports for Ray (both
# nodes share the machine), each node's --node-ip-address from the address its SSH connection came
# in on ($SSH_CONNECTION; the local provider knows the nodes by 127.0.0.1 and 127.0.0.2, though Ray
# reports the head's 127.0.0.1 as the machine's primary address), the v1 autoscaler on the head
# (v2 never starts local-provider workers), no `ray stop`, token authentication.
set -euo pipefail

PACKAGES=(openssh-server rsync netcat-openbsd)
BINARIES=(sshd ssh ssh-keygen rsync nc)
NODE_USER=${HPCDYN_SSH_USER:-hpcdyn-raynode}
USER_COMMENT="hpcdyn throw-away Ray node (tests)"
REPOSITORY=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

die() { echo "local_sshd: $*" >&2; exit "${2:-1}"; }
log() { echo "local_sshd: $*" >&2; }

installed() {
    local binary
    for binary in "${BINARIES[@]}"; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$binary" >/dev/null 2>&1 || return 1
    done
    # Debian's netcat-traditional has no -N and a different -q; the YAML's nc works with either,
    # but insist on the OpenBSD one that was tested.
    { nc -h 2>&1 || true; } | grep -qi openbsd
}

install_packages() {
    if installed; then log "already installed: $(ssh -V 2>&1)"; return 0; fi
    [ "$(id -u)" -eq 0 ] || die "installing needs root (apt-get); run as root or install ${PACKAGES[*]} yourself" 3
    command -v apt-get >/dev/null || die "apt-get not found: this installer targets Debian/Ubuntu" 3
    export DEBIAN_FRONTEND=noninteractive
    # openssh-server's postinst would start a system sshd on port 22: forbid service starts meanwhile.
    local policy=/usr/sbin/policy-rc.d ours=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && ours=1
    fi
    local status=0
    apt-get update -qq || status=$?
    if [ "$status" -eq 0 ]; then
        apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null || status=$?
    fi
    [ "$ours" -eq 0 ] || rm -f "$policy"
    [ "$status" -eq 0 ] || die "apt-get update/install ${PACKAGES[*]} failed (no network or no package mirror)" 3
    installed || die "packages installed but ${BINARIES[*]} (OpenBSD nc) not all found" 3
    log "installed: $(ssh -V 2>&1)"
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

as_user() { setpriv --reuid="$NODE_USER" --regid="$NODE_USER" --init-groups env -i HOME="$NODE_HOME" PATH=/usr/bin:/bin "$@"; }

ensure_user() {
    if ! id "$NODE_USER" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash --comment "$USER_COMMENT" "$NODE_USER"
        log "created user $NODE_USER"
    fi
    NODE_HOME=$(getent passwd "$NODE_USER" | cut -d: -f6)
    # Its home is reset below and `ray down` kills all its Ray processes: only a user made by this script.
    [ "$(getent passwd "$NODE_USER" | cut -d: -f5)" = "$USER_COMMENT" ] ||
        die "user $NODE_USER exists but was not created by this script (comment is not '$USER_COMMENT'); choose another HPCDYN_SSH_USER"
    [ "$(id -u "$NODE_USER")" -ne 0 ] || die "$NODE_USER is root; it must be a throw-away user"
    [ -d "$NODE_HOME" ] || { mkdir -p "$NODE_HOME"; cp -rT /etc/skel "$NODE_HOME"; chown -R "$NODE_USER:" "$NODE_HOME"; }
    # Without PAM, sshd refuses a locked account ('!' password, useradd's default); '*' is no password.
    usermod --password '*' "$NODE_USER"
    if pgrep -u "$NODE_USER" >/dev/null; then
        die "user $NODE_USER has processes running (another session, or a previous one not stopped): $(pgrep -u "$NODE_USER" -l | tr '\n' ' ')"
    fi
    # A fresh login environment: the YAML's setup commands add their lines to ~/.bashrc again.
    cp /etc/skel/.bashrc "$NODE_HOME/.bashrc"
    rm -rf "$NODE_HOME/.ray" "$NODE_HOME"/ray_bootstrap_* "$NODE_HOME"/ray_submit_* "$NODE_HOME/.ssh/config"
    install -d -m 0700 -o "$NODE_USER" -g "$NODE_USER" "$NODE_HOME/.ssh"
    chown "$NODE_USER:" "$NODE_HOME/.bashrc"
    chmod 0755 "$NODE_HOME"
}

# The interpreter the user will run: VENV itself if the user can import ray and hpcdyn with it, else
# DIR/venv (see the header).
prepare_python() {
    local dir=$1 venv=$2 version base candidate python="" site link name first
    if as_user "$venv/bin/python" -c 'import ray, hpcdyn' >/dev/null 2>&1; then
        echo "$venv"; return 0
    fi
    version=$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    base=$("$venv/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    as_user test -r "$site" -a -x "$site" ||
        die "user $NODE_USER cannot read $site (a parent directory is private: chmod o+x it, or use a VENV elsewhere)" 3
    for candidate in "$base" /usr/bin/python"$version" /usr/local/bin/python"$version"; do
        if [ -x "$candidate" ] && as_user "$candidate" -c 'import venv' >/dev/null 2>&1 &&
            [ "$(as_user "$candidate" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" = "$version" ]; then
            python=$candidate; break
        fi
    done
    [ -n "$python" ] || die "user $NODE_USER can run neither $base nor a python$version of the system; install python$version" 3
    "$python" -m venv --without-pip "$dir/venv"
    # `site.addsitedir`, not a bare path: VENV's own .pth files (the editable hpcdyn) are read too.
    echo "import site; site.addsitedir('$site')" >"$("$dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_project_venv.pth"
    for link in "$venv"/bin/*; do
        name=$(basename "$link")
        [ -f "$link" ] && [ ! -e "$dir/venv/bin/$name" ] || continue
        first=$(head -c 200 "$link" | tr -d '\0' | head -n 1)
        [[ "$first" == "#!$venv/bin/python"* ]] || continue
        { echo "#!$dir/venv/bin/python"; tail -n +2 "$link"; } >"$dir/venv/bin/$name"
        chmod 0755 "$dir/venv/bin/$name"
    done
    as_user "$dir/venv/bin/python" -c 'import ray, hpcdyn' ||
        die "user $NODE_USER cannot import ray and hpcdyn with $dir/venv (over $python)" 3
    log "user $NODE_USER cannot run $venv/bin/python (its interpreter $base is private); using $dir/venv over $python"
    echo "$dir/venv"
}

write_sshd_config() {
    local dir=$1 port=$2
    cat >"$dir/sshd_config" <<CONF
# A private sshd for tests (slurm/testing/local_sshd.sh): one throw-away user, one key.
Port $port
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys-$(basename "$dir")
AllowUsers $NODE_USER
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes yes
PrintMotd no
X11Forwarding no
# ray dashboard forwards a port; Ray runs its commands through one multiplexed connection per node.
AllowTcpForwarding local
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
LogLevel VERBOSE
CONF
}

write_cluster_yaml() {
    local dir=$1 port=$2 venv=$3 ray_tmp=$4 gcs dashboard client head_agent worker_agent name
    read -r gcs dashboard client head_agent worker_agent < <(free_ports 5 "$port")
    name="hpcdyn-test-$(basename "$dir")"
    # The node's own address, as the SSH connection reached it (the third field of SSH_CONNECTION):
    # 127.0.0.1 on the head, 127.0.0.2 on the worker, the addresses the local provider knows them by.
    local node_ip='--node-ip-address=$(echo $SSH_CONNECTION | cut -d" " -f3)'
    cat >"$dir/cluster.yaml" <<YAML
# Written by slurm/testing/local_sshd.sh for $dir: slurm/ray-cluster-local.yaml with this machine as
# both nodes (head 127.0.0.1, worker 127.0.0.2, one sshd on port $port for both, user $NODE_USER).
cluster_name: $name

provider:
  type: local
  head_ip: 127.0.0.1
  worker_ips: [127.0.0.2]

auth:
  ssh_user: $NODE_USER
  ssh_private_key: $dir/id_ed25519
  # Ray has no SSH port setting; %h is the node's address.
  ssh_proxy_command: nc %h $port

min_workers: 1
max_workers: 1
upscaling_speed: 1.0
idle_timeout_minutes: 5

file_mounts:
  ~/.ray/auth_token: $dir/auth_token

setup_commands:
  - "test -x $venv/bin/ray || (echo 'no ray in $venv' && exit 1)"
  # RAY_TMPDIR: this user's own temp dir (/tmp/ray may be root's); the activation last, so its python comes first.
  - grep -qxF 'export RAY_TMPDIR=$ray_tmp' ~/.bashrc || echo 'export RAY_TMPDIR=$ray_tmp' >> ~/.bashrc
  - grep -qxF 'export RAY_AUTH_MODE=token' ~/.bashrc || echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc
  - grep -qxF 'source $venv/bin/activate' ~/.bashrc || echo 'source $venv/bin/activate' >> ~/.bashrc

# No \`ray stop\` here (Ray's defaults begin with one). Free ports: both nodes share this machine.
# RAY_enable_autoscaler_v2=0: \`ray up\` turns on autoscaler v2, which never starts the workers of the
# local provider (ray-project/ray#57153); the v1 autoscaler does.
head_start_ray_commands:
  - RAY_enable_autoscaler_v2=0 RAY_AUTH_MODE=token ray start --head $node_ip --port=$gcs --dashboard-host=127.0.0.1 --dashboard-port=$dashboard --ray-client-server-port=$client --dashboard-agent-listen-port=$head_agent --num-cpus=1 --autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats

worker_start_ray_commands:
  - RAY_AUTH_MODE=token ray start --address=\$RAY_HEAD_IP:$gcs $node_ip --dashboard-agent-listen-port=$worker_agent --num-cpus=1 --disable-usage-stats
YAML
}

start() {
    local dir=${1:?usage: local_sshd.sh start DIR [VENV]} venv=${2:-$REPOSITORY/.venv} port ray_tmp
    installed || die "sshd, rsync or nc is not installed; run: $0 install" 3
    [ "$(id -u)" -eq 0 ] || die "starting needs root (a throw-away user is created and sshd switches to it)" 3
    export PATH="$PATH:/usr/sbin:/sbin"
    [ -x "$venv/bin/python" ] || die "no virtual environment at $venv (make install)"
    venv=$(cd "$venv" && pwd)
    mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
    [ ! -e "$dir/sshd.pid" ] || die "$dir already holds an sshd; stop it first"
    chmod 0755 "$dir"
    ensure_user
    as_user test -x "$dir" || die "user $NODE_USER cannot reach $dir (a parent directory is private); use a directory such as /tmp/NAME"
    venv=$(prepare_python "$dir" "$venv")
    # Privilege separation directory; systemd would create it.
    [ -d /run/sshd ] || install -d -m 0755 /run/sshd
    ssh-keygen -q -t ed25519 -N '' -C "hpcdyn-test-host" -f "$dir/ssh_host_ed25519_key"
    ssh-keygen -q -t ed25519 -N '' -C "hpcdyn-test-user" -f "$dir/id_ed25519"
    install -m 0600 -o "$NODE_USER" -g "$NODE_USER" "$dir/id_ed25519.pub" "$NODE_HOME/.ssh/authorized_keys-$(basename "$dir")"
    port=$(free_ports 1)
    echo "$port" >"$dir/port"
    # The head's autoscaler reaches the workers with plain ssh: Ray drops auth.ssh_proxy_command from
    # the copy of the config it gives the head, so the node's own ~/.ssh/config names the port.
    printf '# written by local_sshd.sh for %s\nHost 127.0.0.1 127.0.0.2\n    Port %s\n' "$dir" "$port" >"$dir/node_ssh_config"
    install -m 0600 -o "$NODE_USER" -g "$NODE_USER" "$dir/node_ssh_config" "$NODE_HOME/.ssh/config"
    ( umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$dir/auth_token" )
    chmod 0600 "$dir/auth_token"
    ray_tmp=$(mktemp -d /tmp/hrnXXXXXX)
    chown "$NODE_USER:" "$ray_tmp" && chmod 0700 "$ray_tmp"
    echo "$ray_tmp" >"$dir/ray_tmpdir"
    echo "$NODE_USER" >"$dir/user"
    echo "$venv" >"$dir/venv_path"
    write_sshd_config "$dir" "$port"
    /usr/sbin/sshd -t -f "$dir/sshd_config" || die "sshd rejects $dir/sshd_config"
    /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
    for _ in $(seq 1 50); do
        [ -s "$dir/sshd.pid" ] && ssh -q -i "$dir/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes \
            -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -p "$port" "$NODE_USER@127.0.0.1" true 2>/dev/null && break
        sleep 0.2
    done
    ssh -q -i "$dir/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -p "$port" "$NODE_USER@127.0.0.1" true ||
        die "cannot log in as $NODE_USER on 127.0.0.1:$port; see $dir/sshd.log"
    write_cluster_yaml "$dir" "$port" "$venv" "$ray_tmp"
    log "up: ssh -i $dir/id_ed25519 -p $port $NODE_USER@127.0.0.1; ray up $dir/cluster.yaml"
}

stop() {
    local dir=${1:?usage: local_sshd.sh stop DIR} pid pids ray_tmp home user
    user=$(cat "$dir/user" 2>/dev/null || echo "$NODE_USER")
    if [ -f "$dir/sshd.pid" ]; then
        pid=$(cat "$dir/sshd.pid")
        # Only the listener whose PID file is ours; its per-connection children end with it.
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && { log "sshd ($pid) ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; }
        fi
        rm -f "$dir/sshd.pid"
    fi
    # What `ray down` left of the throw-away user's processes (nothing, normally), one PID at a time.
    if id "$user" >/dev/null 2>&1; then
        pids=$(pgrep -u "$user" || true)
        if [ -n "$pids" ]; then
            log "ending what is left of $user's processes: $(pgrep -u "$user" -l | tr '\n' ' ')"
            for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
            sleep 2
            for pid in $(pgrep -u "$user" || true); do kill -KILL "$pid" 2>/dev/null || true; done
        fi
        home=$(getent passwd "$user" | cut -d: -f6)
        rm -f "$home/.ssh/authorized_keys-$(basename "$dir")"
        # What this DIR's cluster put in the home: its token, the launcher's copy of the key and YAML,
        # the port, the lines of the setup commands.
        if grep -qF "written by local_sshd.sh for $dir" "$home/.ssh/config" 2>/dev/null; then
            rm -f "$home/.ssh/config" "$home/.ray/auth_token" "$home"/ray_bootstrap_config.yaml "$home"/ray_bootstrap_key.pem
            install -m 0644 -o "$user" -g "$user" /etc/skel/.bashrc "$home/.bashrc"
        fi
        # The user's files in /tmp (Ray's SSH control sockets, Python's multiprocessing dirs): the
        # user is ours alone, so all of them are this node's.
        find /tmp -maxdepth 1 -mindepth 1 -user "$user" -exec rm -rf {} + 2>/dev/null || true
    fi
    if [ -f "$dir/ray_tmpdir" ]; then
        ray_tmp=$(cat "$dir/ray_tmpdir")
        [[ "$ray_tmp" == /tmp/hrn* ]] && rm -rf "$ray_tmp"
        rm -f "$dir/ray_tmpdir"
    fi
}

case "${1:-}" in
    install) install_packages ;;
    start) start "${2:-}" "${3:-}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 install | start DIR [VENV] | stop DIR" 2 ;;
esac
