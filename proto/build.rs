//! Compiles the .proto files with protoc (Debian's `protobuf-compiler`; etcd-client needs it too).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "dapr/proto/common/v1/common.proto",
        "dapr/proto/runtime/v1/dapr.proto",
        "dapr/proto/runtime/v1/appcallback.proto",
        "tandem/internal/v1/mesh.proto",
        "tandem/internal/v1/pubsub.proto",
        "tandem/internal/v1/group.proto",
        "tandem/group/v1/group.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // An event's payload is shared, not copied, as it is cloned on its way (cached in the
    // outbox, handed to a delivery, retried).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".dapr.proto.runtime.v1.PublishEventRequest.data")
        .bytes(".dapr.proto.runtime.v1.TopicEventRequest.data")
        // Gradient buffers and states: megabytes that pass through without a copy.
        .bytes(".tandem.internal.v1.GroupChunk.data")
        .bytes(".tandem.group.v1")
        .compile_protos(&protos, &["."])?;
    Ok(())
}
