#!/usr/bin/env bash
# A real one-node Kubernetes on this machine for the real-node tier: etcd, kube-apiserver, controller-manager and
# scheduler (tests/cluster/build.sh), a containerd of its own (Debian's, with runc and the CNI bridge plugin),
# kubelet, kube-proxy and CoreDNS (tests/pods/build.sh). Pods live on the bridge tmbr0, 10.244.0.0/24, whose
# gateway 10.244.0.1 is the apiserver's, kubelet's and DNS's address; Services are 10.96.0.0/24. Nothing from a
# pod is forwarded off the bridge and pods get no default route.
#
#   cluster.sh up            start everything; KUBECONFIG=$D/run/kubeconfig (`cluster.sh env` prints it)
#   cluster.sh load IMAGE..  copy images from the docker engine into the node's containerd
#   cluster.sh down          stop everything and give the host back as it was: iptables, nft tables, sysctls,
#                            mounts, links, routes, cgroups and folders
#
# Environment: TOOLMESH_PODS_STATE (default $TMPDIR/toolmesh-pods), CLUSTER_BIN (tests/cluster/build.sh's
# folder), PODS_BIN (tests/pods/build.sh's folder). Needs root.
set -euo pipefail
STATE="${TOOLMESH_PODS_STATE:-${TMPDIR:-/tmp}/toolmesh-pods}"
D="$STATE/cluster"; R="$D/run"; K8S="$D/k8s-state"
BR=tmbr0; GW=10.244.0.1; POD_CIDR=10.244.0.0/24; SVC_CIDR=10.96.0.0/24
API="https://$GW:26443"; NODE=toolmesh-node
CTRD_SOCK="$D/containerd/containerd.sock"
PATH="$PATH:/usr/sbin:/sbin"

log() { echo "    [$(date +%T)] $*"; }
start() { local name=$1; shift; "$@" >"$R/$name.log" 2>&1 & echo $! >"$R/$name.pid"; }
need_bins() {
    CLUSTER_BIN="${CLUSTER_BIN:?tests/cluster/build.sh\'s folder}"; PODS_BIN="${PODS_BIN:?tests/pods/build.sh\'s folder}"
}
kc() { "${CLUSTER_BIN:+$CLUSTER_BIN/}kubectl" --kubeconfig "$R/kubeconfig" "$@"; }

kubeconfig() {  # kubeconfig NAME CERT
    cat >"$R/$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: toolmesh-node, cluster: {server: "$API", certificate-authority: $R/ca.crt}}]
users: [{name: $1, user: {client-certificate: $R/$2.crt, client-key: $R/$2.key}}]
contexts: [{name: toolmesh-node, context: {cluster: toolmesh-node, user: $1}}]
current-context: toolmesh-node
KC
}

client_cert() {  # client_cert FILE SUBJECT
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 2 2>/dev/null
}

certs() {
    (
        cd "$R"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj "/CN=toolmesh-node-ca" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
        printf "subjectAltName=IP:127.0.0.1,IP:%s,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n" "$GW" >san.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 2 -extfile san.ext 2>/dev/null
        client_cert admin "/CN=admin/O=system:masters"
        client_cert kubelet "/CN=system:node:$NODE/O=system:nodes"
        client_cert kube-proxy "/CN=system:kube-proxy"
        openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    )
    kubeconfig admin admin; kubeconfig kubelet kubelet; kubeconfig kube-proxy kube-proxy
    cp "$R/admin.kubeconfig" "$R/kubeconfig"
}

# Host settings this cluster changes: the kubelet sets the first six (protectKernelDefaults would refuse to start
# instead), routing between the bridge and the Service addresses needs the last two. Saved once, restored by down.
SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys
kernel.keys.root_maxbytes net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables"

network() {  # the pods' bridge, made before the apiserver binds its address
    ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge
    ip addr replace "$GW/24" dev "$BR"
    ip link set "$BR" up
    ip route replace "$SVC_CIDR" dev "$BR"   # ClusterIPs never take the default route, even before kube-proxy syncs
    sysctl -q -w net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
    # Bridge to bridge only: nothing from a pod leaves the machine, nothing from outside reaches a pod.
    iptables -C FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null || iptables -I FORWARD 1 -i "$BR" -o "$BR" -j ACCEPT
    iptables -C FORWARD -i "$BR" ! -o "$BR" -j DROP 2>/dev/null || iptables -I FORWARD 2 -i "$BR" ! -o "$BR" -j DROP
    iptables -C FORWARD ! -i "$BR" -o "$BR" -j DROP 2>/dev/null || iptables -I FORWARD 3 ! -i "$BR" -o "$BR" -j DROP
}

containerd_up() {
    mkdir -p "$D/containerd" "$D/cni/net.d"
    cat >"$D/containerd/config.toml" <<TOML
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
[grpc]
  address = "$CTRD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/local/pause:3.10"
  # Where root lacks CAP_SYS_RESOURCE (as in some VMs) a negative oom_score_adj fails every sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/cni/net.d"
TOML
    cat >"$D/cni/net.d/10-toolmesh.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "toolmesh-pods",
  "plugins": [
    {"type": "bridge", "bridge": "$BR", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$D/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$GW"}]],
              "routes": [{"dst": "$SVC_CIDR"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
    if ! ctr -a "$CTRD_SOCK" version >/dev/null 2>&1; then
        containerd --config "$D/containerd/config.toml" >"$D/containerd/containerd.log" 2>&1 &
        echo $! >"$D/containerd/containerd.pid"
        for _ in $(seq 1 100); do ctr -a "$CTRD_SOCK" version >/dev/null 2>&1 && break; sleep 0.1; done
        ctr -a "$CTRD_SOCK" version >/dev/null
    fi
}

wait_until() {  # wait_until SECONDS WHAT CMD...: poll every 0.2 s
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    while ((SECONDS < deadline)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "cluster.sh: $what not ready after ${seconds}s" >&2
    return 1
}

node_ready() { [ "$(kc get node $NODE -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }

up() {
    need_bins
    [ "$(id -u)" -eq 0 ] || { echo "cluster.sh: the node needs root (kubelet, containerd, the bridge)" >&2; exit 1; }
    for b in containerd ctr /usr/lib/cni/bridge iptables nft openssl; do
        command -v "$b" >/dev/null || [ -x "$b" ] || { echo "cluster.sh: missing $b (make system-deps)" >&2; exit 1; }
    done
    [ -f "$D/host-saved" ] && { log "a previous run left state behind: down first"; down; }
    mkdir -p "$D"
    # shellcheck disable=SC2086 # a list of names
    sysctl $SYSCTLS | sed 's/ = /=/' >"$D/sysctl-before.conf"
    nft list tables >"$D/nft-tables-before"
    for d in /var/lib/kubelet /var/log/pods /var/log/containers /run/netns; do [ -e "$d" ] || echo "$d"; done >"$D/dirs-created"
    touch "$D/host-saved"
    rm -rf "$R"; mkdir -p "$R"; certs; network; containerd_up
    log "control plane"
    start etcd "$CLUSTER_BIN/etcd" --data-dir "$R/etcd" --listen-client-urls http://127.0.0.1:22379 \
        --advertise-client-urls http://127.0.0.1:22379 --listen-peer-urls http://127.0.0.1:22380 --unsafe-no-fsync --log-level warn
    start apiserver "$CLUSTER_BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:22379 --bind-address=$GW \
        --advertise-address=$GW --secure-port=26443 --tls-cert-file="$R/apiserver.crt" --tls-private-key-file="$R/apiserver.key" \
        --client-ca-file="$R/ca.crt" --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$R/sa.pub" \
        --service-account-signing-key-file="$R/sa.key" --authorization-mode=Node,RBAC --service-cluster-ip-range=$SVC_CIDR \
        --enable-priority-and-fairness=false --enable-admission-plugins=NodeRestriction \
        --kubelet-client-certificate="$R/admin.crt" --kubelet-client-key="$R/admin.key" --kubelet-preferred-address-types=InternalIP
    wait_until 60 "kube-apiserver" kc get --raw /readyz
    start kcm "$CLUSTER_BIN/kube-controller-manager" --kubeconfig="$R/kubeconfig" --service-account-private-key-file="$R/sa.key" \
        --root-ca-file="$R/ca.crt" --bind-address=127.0.0.1 --secure-port=0 --leader-elect=false
    start scheduler "$CLUSTER_BIN/kube-scheduler" --kubeconfig="$R/kubeconfig" --bind-address=127.0.0.1 --secure-port=0 --leader-elect=false
    cat >"$R/Corefile" <<COREFILE
cluster.local:53 {
    bind $GW
    errors
    health 127.0.0.1:18080
    ready 127.0.0.1:18181
    kubernetes cluster.local {
        kubeconfig $R/kubeconfig toolmesh-node
    }
    cache 30
}
COREFILE
    start coredns "$PODS_BIN/coredns" -conf "$R/Corefile"
    log "node"
    mkdir -p "$K8S/kubelet"
    printf 'nameserver 127.0.0.1\n' >"$R/pod-resolv.conf"   # dnsPolicy Default: no resolver reachable from a pod
    cat >"$R/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GW
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $R/ca.crt}}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$CTRD_SOCK
imageServiceEndpoint: unix://$CTRD_SOCK
clusterDomain: cluster.local
clusterDNS: [$GW]
resolvConf: $R/pod-resolv.conf
serializeImagePulls: false
syncFrequency: 10s                    # (default 1m) ConfigMap edits reach mounted volumes within ~10-20 s
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
YAML
    start kubelet "$PODS_BIN/kubelet" --config="$R/kubelet.yaml" --kubeconfig="$R/kubelet.kubeconfig" \
        --root-dir="$K8S/kubelet" --cert-dir="$K8S/kubelet/pki" --hostname-override=$NODE --node-ip=$GW -v=1
    cat >"$R/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $R/kube-proxy.kubeconfig}
hostnameOverride: $NODE
mode: iptables
clusterCIDR: $POD_CIDR
bindAddress: $GW
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$GW/32"]
iptables: {localhostNodePorts: false}
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
    start kube-proxy "$PODS_BIN/kube-proxy" --config="$R/kube-proxy.yaml"
    wait_until 90 "node $NODE" node_ready
    wait_until 60 "CoreDNS" curl -sf http://127.0.0.1:18181/ready
    wait_until 60 "kube-proxy" curl -sf http://127.0.0.1:10256/healthz
    wait_until 60 "the default ServiceAccount" kc get serviceaccount default
    log "up; KUBECONFIG=$R/kubeconfig"
}

load() {  # load IMAGE...: from the docker engine into the node's containerd (image: toolmesh:dev finds docker.io/library/toolmesh:dev)
    for image in "$@"; do
        docker save "$image" | ctr -a "$CTRD_SOCK" -n k8s.io images import - >/dev/null
    done
}

stop_pid() {  # stop_pid DIR NAME: SIGTERM, then SIGKILL after 10 s
    local f="$1/$2.pid"
    [ -f "$f" ] || return 0
    local pid; pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then log "$2 ignored SIGTERM for 10 s: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$f"
}

down() {
    CLUSTER_BIN="${CLUSTER_BIN:-}"; PODS_BIN="${PODS_BIN:-}"
    log "down: pods"
    stop_pid "$R" kcm; stop_pid "$R" scheduler   # nothing recreates pods from here on
    # Pods deleted while the kubelet runs are stopped through the CRI, so CNI DEL frees their veths and addresses.
    if [ -f "$R/kubelet.pid" ] && [ -f "$R/apiserver.pid" ]; then
        kc delete pod --all -A --grace-period=1 --wait=false >/dev/null 2>&1 || true
        for _ in $(seq 1 60); do [ -z "$(kc get pods -A -o name 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    log "down: processes"
    for p in coredns kube-proxy kubelet apiserver etcd; do stop_pid "$R" $p; done
    if ctr -a "$CTRD_SOCK" version >/dev/null 2>&1; then   # anything the kubelet left behind
        for t in $(ctr -a "$CTRD_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do ctr -a "$CTRD_SOCK" -n k8s.io tasks kill -s SIGKILL "$t" 2>/dev/null || true; done
        for _ in $(seq 1 20); do [ -z "$(ctr -a "$CTRD_SOCK" -n k8s.io tasks ls -q 2>/dev/null)" ] && break; sleep 0.1; done
        for t in $(ctr -a "$CTRD_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do ctr -a "$CTRD_SOCK" -n k8s.io tasks delete -f "$t" >/dev/null 2>&1 || true; done
        for c in $(ctr -a "$CTRD_SOCK" -n k8s.io containers ls -q 2>/dev/null); do ctr -a "$CTRD_SOCK" -n k8s.io containers delete "$c" >/dev/null 2>&1 || true; done
    fi
    stop_pid "$D/containerd" containerd
    log "down: host state"
    for n in $(ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ {print $1}'); do ip netns delete "$n" 2>/dev/null || true; done
    rm -rf "$D/cni/ipam"
    [ -n "$PODS_BIN" ] && [ -x "$PODS_BIN/kube-proxy" ] && { "$PODS_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true; }
    for ipt in iptables ip6tables; do   # the kubelet's own chains
        for c in INPUT OUTPUT; do $ipt -D $c -j KUBE-FIREWALL 2>/dev/null || true; done
        { $ipt -F KUBE-FIREWALL && $ipt -X KUBE-FIREWALL; } 2>/dev/null || true
        for t in mangle nat filter; do { $ipt -t $t -F KUBE-KUBELET-CANARY && $ipt -t $t -X KUBE-KUBELET-CANARY; } 2>/dev/null || true; done
        $ipt -t mangle -X KUBE-IPTABLES-HINT 2>/dev/null || true
    done
    iptables -D FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null || true
    iptables -D FORWARD -i "$BR" ! -o "$BR" -j DROP 2>/dev/null || true
    iptables -D FORWARD ! -i "$BR" -o "$BR" -j DROP 2>/dev/null || true
    ip route del "$SVC_CIDR" dev "$BR" 2>/dev/null || true
    ip link del "$BR" 2>/dev/null || true
    { grep -o " ${K8S}[^ ]*\| ${D}/containerd[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    for h in /sys/fs/cgroup/*/kubepods; do [ -d "$h" ] && { find "$h" -depth -type d -exec rmdir {} + 2>/dev/null || true; }; done
    if [ -f "$D/sysctl-before.conf" ]; then sysctl -q -p "$D/sysctl-before.conf" || true; rm -f "$D/sysctl-before.conf"; fi
    if [ -f "$D/nft-tables-before" ]; then
        nft list tables | while read -r _ fam name; do
            grep -qx "table $fam $name" "$D/nft-tables-before" || nft delete table "$fam" "$name" 2>/dev/null || true
        done
        rm -f "$D/nft-tables-before"
    fi
    if [ -f "$D/dirs-created" ]; then
        while read -r d; do umount "$d" 2>/dev/null || true; rm -rf --one-file-system "$d"; done <"$D/dirs-created"
        rm -f "$D/dirs-created"
    fi
    rmdir /run/containerd/runc/k8s.io /run/containerd/runc /run/containerd/s /run/containerd/fifo 2>/dev/null || true
    rm -rf "$K8S" "$D/containerd/state"
    rm -f "$D/host-saved"
    log "down: done"
}

env() { echo "export KUBECONFIG=$R/kubeconfig"; }

cmd="${1:?up|load|down|env}"; shift
"$cmd" "$@"
