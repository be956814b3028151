# Shared by bench/affinity.sh and bench/rate_sweep.sh: start superpose-server replicas
# and an nginx from deploy/nginx/superpose.conf on loopback ports, stop them on exit.
# Source it; it uses $build, $out, $server_flags.
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop_all EXIT

# start_replica I: sets port[I] (gRPC) and mport[I] (metrics).
declare -A port mport
start_replica() {
  rm -f "$out/port$1" "$out/mport$1"
  "$build/superpose-server" --backend=cpu --listen=127.0.0.1:0 --port_file="$out/port$1" \
    --metrics_listen=127.0.0.1:0 --metrics_port_file="$out/mport$1" --log_level=warn \
    $server_flags >"$out/server$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do [ -s "$out/port$1" ] && [ -s "$out/mport$1" ] && break; sleep 0.1; done
  port[$1]=$(cat "$out/port$1"); mport[$1]=$(cat "$out/mport$1")
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_nginx BALANCE N: nginx in front of replicas 0..N-1; sets nginx_port. BALANCE:
# "affinity" or "least_conn" (the config as shipped), "round_robin" (least_conn removed:
# nginx's default round robin for requests without the header).
start_nginx() {
  local d="$out/nginx-$1" user=""
  rm -rf "$d"; mkdir -p "$d"
  nginx_port=$(free_port)
  sed "s/listen 8080/listen 127.0.0.1:$nginx_port/" deploy/nginx/superpose.conf >"$d/superpose.conf"
  [ "$1" = round_robin ] && sed -i '/^    least_conn;$/d' "$d/superpose.conf"
  for i in $(seq 0 $(($2 - 1))); do
    echo "server 127.0.0.1:${port[$i]} max_fails=1 fail_timeout=10s;"
  done >"$d/superpose-replicas.conf"
  [ "$(id -u)" = 0 ] && user="user root;"
  cat >"$d/nginx.conf" <<CONF
$user
daemon off;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $d/client_body; proxy_temp_path $d/proxy;
  fastcgi_temp_path $d/fastcgi; uwsgi_temp_path $d/uwsgi; scgi_temp_path $d/scgi;
  include superpose.conf;
}
CONF
  "${SUPERPOSE_NGINX:-/usr/sbin/nginx}" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" &
  pids+=($!)
  for _ in $(seq 1 100); do (: >/dev/tcp/127.0.0.1/$nginx_port) 2>/dev/null && return; sleep 0.1; done
  echo "nginx did not start: $(cat "$d/error.log")" >&2; exit 1
}

# metric MPORT NAME: the sum of NAME's samples on a replica's /metrics.
metric() {
  curl -s "127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 {s += $2} END {print s + 0}'
}
