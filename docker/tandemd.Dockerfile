# tandemd, the Tandem sidecar. FROM scratch: scripts/build-images.sh assembles build/ on the host
# (the stripped binary, the shared libraries ldd lists, nsswitch.conf, passwd), so building pulls
# no base image. Health: `tandemd probe` asks its own /readyz (there is no curl in the image).
FROM scratch
COPY build/base/ /
COPY --chown=65532:65532 build/data/ /var/lib/tandem/
COPY build/bin/tandemd /usr/local/bin/tandemd
USER 65532:65532
WORKDIR /var/lib/tandem
ENV TANDEM_DATA_DIR=/var/lib/tandem
EXPOSE 50001 50002 9090
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["/usr/local/bin/tandemd", "probe"]
ENTRYPOINT ["/usr/local/bin/tandemd"]
