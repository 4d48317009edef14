# tandem, the command line; compose.yaml's `certs` service runs `tandem certs renew --every`
# with it (the project's CA for mutual TLS between the sidecars).
# FROM scratch: scripts/build-images.sh assembles build/ on the host (the stripped binary and the
# shared libraries ldd lists), so building pulls no base image.
FROM scratch
COPY build/base/ /
COPY build/bin/tandem /usr/local/bin/tandem
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/tandem"]
