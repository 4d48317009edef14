# tandem-train, a pipeline service; it runs beside its own tandemd (compose.yaml, manifests/).
# FROM scratch: scripts/build-images.sh assembles build/ on the host (the stripped binary and the
# shared libraries ldd lists), so building pulls no base image.
FROM scratch
COPY build/base/ /
COPY build/bin/tandem-train /usr/local/bin/tandem-train
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/tandem-train"]
