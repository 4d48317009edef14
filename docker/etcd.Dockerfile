# etcd from the host's Debian etcd-server binary (/usr/bin/etcd), for machines that cannot pull
# the upstream image (the compose test). Laid out like the upstream image: /usr/local/bin/etcd,
# so compose.yaml's command works with either (ETCD_IMAGE picks which).
FROM scratch
COPY build/base/ /
COPY build/bin/etcd /usr/local/bin/etcd
WORKDIR /var/lib/etcd
EXPOSE 2379 2380
CMD ["/usr/local/bin/etcd"]
