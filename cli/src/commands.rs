//! `tandem invoke`, `publish`, `state get`, `ls` and `unsubscribe`: requests to a running mesh.

use std::io::{IsTerminal, Write};

use serde_json::json;
use tandem_sdk::{CallOptions, SidecarClient};
use tandem_transport::SpiffeId;

use crate::args::{
    CertsCheckArgs, CertsInitArgs, CertsIssueArgs, CertsRenewArgs, Global, InvokeArgs, LsArgs, PublishArgs,
    StateGetArgs, SynthArgs, UnsubscribeArgs,
};
use crate::error::CliError;
use crate::registry::{self, Registry};
use crate::{certs, payload};

/// Where a sidecar is expected when neither --sidecar nor etcd names one (Dapr's default port).
pub const DEFAULT_SIDECAR: &str = "127.0.0.1:50001";

/// `--sidecar` as the `host:port` the SDK dials: `http://HOST:PORT` or `HOST:PORT`.
pub fn sidecar_address(url: &str) -> Result<String, CliError> {
    let bad = |why: &str| CliError::usage(format!("--sidecar '{url}': {why}; expected http://HOST:PORT"));
    if url.starts_with("https://") {
        return Err(bad("TLS is not supported (tandemd serves plain gRPC)"));
    }
    let rest = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
    if rest.contains('/') || rest.contains("://") {
        return Err(bad("not a sidecar address"));
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(rest.to_string()),
        _ => Err(bad("no valid port")),
    }
}

/// The sidecar that relays a request: --sidecar, else one found through etcd (one of
/// `preferred`'s when it has one), else [`DEFAULT_SIDECAR`]. With etcd consulted, an
/// unknown `must_know` app-id is refused before anything is sent.
async fn relay_sidecar(
    global: &Global,
    preferred: Option<&str>,
    must_know: Option<&str>,
) -> Result<(String, String), CliError> {
    if let Some(url) = &global.sidecar {
        return Ok((sidecar_address(url)?, "--sidecar".to_string()));
    }
    let registry = Registry::load(&global.etcd_access()?, &global.namespace).await?;
    if let Some(app) = must_know {
        registry.instances(app)?;
    }
    Ok(match registry.any_sidecar(preferred) {
        Some((address, record)) => (address, format!("the sidecar of app '{}'", record.app_id)),
        None => (DEFAULT_SIDECAR.to_string(), "the default sidecar address".to_string()),
    })
}

fn client(address: &str) -> Result<SidecarClient, CliError> {
    SidecarClient::new(address).map_err(|status| CliError::usage(status.message().to_string()))
}

/// Writes an answer to stdout: text as is (with a final newline), bytes as they are unless
/// stdout is a terminal.
fn print_value(bytes: &[u8], what: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    let written = match std::str::from_utf8(bytes) {
        Ok("") => Ok(()),
        Ok(text) if text.ends_with('\n') => out.write_all(text.as_bytes()),
        Ok(text) => writeln!(out, "{text}"),
        Err(_) if out.is_terminal() => {
            return Err(CliError::failed(format!(
                "{what} is {} bytes of binary data; redirect stdout to a file to save it",
                bytes.len()
            )));
        }
        Err(_) => out.write_all(bytes),
    };
    written.and_then(|_| out.flush()).map_err(|e| CliError::failed(format!("writing to stdout: {e}")))
}

/// `tandem invoke APP METHOD [--data JSON]`: prints the app's answer.
pub async fn invoke(global: &Global, call: InvokeArgs) -> Result<(), CliError> {
    let data = payload::read(&call.data)?;
    let (address, via) = relay_sidecar(global, Some(&call.app), Some(&call.app)).await?;
    let mut options = CallOptions::default().timeout(call.timeout);
    if data.is_some() {
        options = options.content_type(payload::JSON);
    }
    let sidecar = client(&address)?;
    let reply =
        sidecar.invoke_with(&call.app, &call.method, data.unwrap_or_default(), options).await.map_err(|status| {
            let what = format!("invoking '{}' on app '{}' through {via} ({address})", call.method, call.app);
            CliError::from_status(&what, &status)
        })?;
    print_value(&reply.data, "the answer")
}

/// `tandem publish PUBSUB TOPIC --data JSON`: returns once the sidecar stored the event.
pub async fn publish(global: &Global, event: PublishArgs) -> Result<(), CliError> {
    let data = payload::read(&event.data)?
        .ok_or_else(|| CliError::usage("publish needs the event: --data JSON or --data-file PATH"))?;
    let (address, via) = relay_sidecar(global, None, None).await?;
    let sidecar = client(&address)?;
    let publishing = sidecar.publish(&event.pubsub, &event.topic, data, payload::JSON);
    let published = tokio::time::timeout(event.timeout, publishing)
        .await
        .map_err(|_| CliError::unreachable(format!("no answer from {via} ({address}) within {:?}", event.timeout)))?;
    published.map_err(|status| {
        let what = format!("publishing to topic '{}' of '{}' through {via} ({address})", event.topic, event.pubsub);
        CliError::from_status(&what, &status)
    })?;
    eprintln!("published to topic '{}' of pub/sub '{}' through {via} ({address})", event.topic, event.pubsub);
    Ok(())
}

/// `tandem state get APP KEY`: reads through a sidecar of APP, since each app's state lives in
/// its own sidecar's stores (under keys only that app-id sees).
pub async fn state_get(global: &Global, get: StateGetArgs) -> Result<(), CliError> {
    let (address, via) = match &global.sidecar {
        Some(url) => {
            let address = sidecar_address(url)?;
            let sidecar_app = client(&address)?
                .metadata()
                .await
                .map_err(|status| {
                    CliError::from_status(&format!("asking the sidecar at {address} who it is"), &status)
                })?
                .id;
            if sidecar_app != get.app {
                return Err(CliError::usage(format!(
                    "the sidecar at {address} fronts app '{sidecar_app}', not '{}': an app's state is read \
                     through its own sidecar (leave out --sidecar to find it through etcd)",
                    get.app
                )));
            }
            (address, "--sidecar".to_string())
        }
        None => {
            let registry = Registry::load(&global.etcd_access()?, &global.namespace).await?;
            let (address, record) = registry.sidecar_of(&get.app, get.instance.as_deref())?;
            let instances = registry.instances(&get.app)?.len();
            if instances > 1 && get.instance.is_none() {
                eprintln!(
                    "note: app '{}' has {instances} instances; reading from {} (--instance picks another)",
                    get.app, record.instance_id
                );
            }
            (address, format!("instance {} of app '{}'", record.instance_id, get.app))
        }
    };
    let sidecar = client(&address)?;
    let reading = sidecar.get_state(&get.store, &get.key);
    let entry = tokio::time::timeout(get.timeout, reading)
        .await
        .map_err(|_| CliError::unreachable(format!("no answer from {via} ({address}) within {:?}", get.timeout)))?
        .map_err(|status| {
            let what = format!("reading '{}' from store '{}' through {via} ({address})", get.key, get.store);
            CliError::from_status(&what, &status)
        })?
        .ok_or_else(|| {
            CliError::not_found(format!("no key '{}' in store '{}' of app '{}'", get.key, get.store, get.app))
        })?;
    if get.etag {
        eprintln!("etag: {}", entry.etag);
    }
    print_value(&entry.value, &format!("the value of '{}'", get.key))
}

/// `tandem ls`: the apps of the namespace, their live instances and the subscriptions.
pub async fn ls(global: &Global, ls: LsArgs) -> Result<(), CliError> {
    let registry = Registry::load(&global.etcd_access()?, &global.namespace).await?;
    let text = if ls.json { ls_json(&registry) } else { ls_table(&registry, &global.etcd.join(",")) };
    print_value(text.as_bytes(), "the listing")
}

/// `tandem unsubscribe PUBSUB TOPIC APP`: deletes the subscription's record from etcd. The
/// publishers' sidecars see it go and release the events they kept for it (`pubsub.embedded`);
/// with `pubsub.jetstream` the events wait in the app's durable consumer, which NATS removes
/// after `consumerInactiveThreshold`.
pub async fn unsubscribe(global: &Global, remove: UnsubscribeArgs) -> Result<(), CliError> {
    let UnsubscribeArgs { pubsub, topic, app, force } = &remove;
    let namespace = &global.namespace;
    Registry::load(&global.etcd_access()?, namespace).await?.check_unsubscribe(pubsub, topic, app, *force)?;
    if !registry::remove_subscription(&global.etcd_access()?, namespace, pubsub, topic, app).await? {
        return Err(CliError::not_found(format!(
            "app '{app}''s subscription to topic '{topic}' of pub/sub '{pubsub}' was removed meanwhile"
        )));
    }
    eprintln!(
        "removed app '{app}''s subscription to topic '{topic}' of pub/sub '{pubsub}' in namespace '{namespace}': \
         publishers release the events they kept for it"
    );
    Ok(())
}

fn ls_json(registry: &Registry) -> String {
    let apps: Vec<_> =
        registry.apps.iter().map(|(app_id, instances)| json!({"app_id": app_id, "instances": instances})).collect();
    let subscriptions: Vec<_> = registry
        .subscriptions
        .iter()
        .map(|((pubsub, topic), subscribers)| {
            let apps: Vec<&str> = subscribers.iter().map(|s| s.app_id.as_str()).collect();
            json!({"pubsub": pubsub, "topic": topic, "apps": apps, "subscribers": subscribers})
        })
        .collect();
    let all = json!({"namespace": registry.namespace, "apps": apps, "subscriptions": subscriptions});
    serde_json::to_string_pretty(&all).expect("JSON values always serialize")
}

fn ls_table(registry: &Registry, etcd: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "namespace '{}' in etcd {etcd}", registry.namespace);
    if registry.apps.is_empty() {
        out.push_str("no apps registered\n");
        return out;
    }
    let width = registry.apps.keys().map(String::len).max().unwrap_or(0).max(3);
    let _ = writeln!(
        out,
        "{:<width$}  {:<32}  {:<21}  {:<21}  {:<3}  VERSION",
        "APP", "INSTANCE", "SIDECAR API", "INTERNAL", "APP"
    );
    for (app_id, instances) in &registry.apps {
        if instances.is_empty() {
            let _ = writeln!(out, "{app_id:<width$}  (no live instance)");
        }
        for record in instances {
            let _ = writeln!(
                out,
                "{app_id:<width$}  {:<32}  {:<21}  {:<21}  {:<3}  {}",
                record.instance_id,
                record.api_address.as_deref().unwrap_or("-"),
                record.internal_address,
                if record.has_app { "yes" } else { "no" },
                record.runtime_version
            );
        }
    }
    if !registry.subscriptions.is_empty() {
        out.push_str("\nSUBSCRIPTION (pubsub/topic)  APPS (stream: a streaming subscription; -> route)\n");
        for ((pubsub, topic), subscribers) in &registry.subscriptions {
            let apps: Vec<String> = subscribers.iter().map(describe_subscriber).collect();
            let _ = writeln!(out, "{:<28} {}", format!("{pubsub}/{topic}"), apps.join(", "));
        }
    }
    out
}

/// A subscriber as `tandem ls` lists it: `app`, `app (stream)`, `app -> /route`.
fn describe_subscriber(subscriber: &tandem_sidecar::discovery::Subscriber) -> String {
    let mut text = subscriber.app_id.clone();
    if subscriber.streaming {
        text.push_str(" (stream)");
    }
    if !subscriber.path.is_empty() {
        text.push_str(" -> ");
        text.push_str(&subscriber.path);
    }
    text
}

/// `tandem dataset synth`: the seeded synthetic rows, written on a blocking thread.
pub async fn dataset_synth(synth: SynthArgs) -> Result<(), CliError> {
    let text = format!("synthetic:{}:{}:{}", synth.rows, synth.features, synth.classes);
    let spec = tandem_model::SyntheticSpec::parse(&text)
        .map_err(|e| CliError::usage(e.to_string()))?
        .expect("a synthetic spec");
    let out = synth.out.clone();
    let written = tokio::task::spawn_blocking(move || tandem_ingest::synth::write(spec, synth.seed, &out))
        .await
        .map_err(|e| CliError::failed(format!("writing the dataset: {e}")))?
        .map_err(|e| CliError::failed(e.to_string()))?;
    println!(
        "wrote {} rows ({} features, {} classes, seed {}) to {} ({} bytes)",
        written.rows,
        spec.features,
        spec.classes,
        synth.seed,
        written.path.display(),
        written.bytes
    );
    Ok(())
}

/// `tandem certs init`.
pub fn certs_init(init: CertsInitArgs) -> Result<(), CliError> {
    let written = certs::init(&init.dir, &init.name, init.ttl, init.force)?;
    println!(
        "wrote a root: {} (the trust anchor for --trust-anchors-file) and {} (keep it secret)",
        written[0].display(),
        written[1].display()
    );
    Ok(())
}

/// The SPIFFE id of `app_id`, each part checked as tandemd checks its own.
fn spiffe_id(trust_domain: &str, namespace: &str, app_id: &str) -> Result<SpiffeId, CliError> {
    for (what, name) in [("--app-id", app_id), ("--namespace", namespace), ("--trust-domain", trust_domain)] {
        tandem_sidecar::config::validate_name(what, name).map_err(CliError::usage)?;
    }
    Ok(SpiffeId::new(trust_domain, namespace, app_id))
}

/// `tandem certs issue`.
pub fn certs_issue(global: &Global, issue: CertsIssueArgs) -> Result<(), CliError> {
    let id = spiffe_id(&issue.svid.trust_domain, &global.namespace, &issue.app_id)?;
    let out = issue.out.clone().unwrap_or_else(|| issue.svid.dir.clone());
    let written = certs::issue_files(&issue.svid.dir, &id, issue.svid.ttl, &out)?;
    println!("issued {id}: {} (--cert-file) and {} (--key-file)", written[0].display(), written[1].display());
    Ok(())
}

/// How long until `expires`, as `23h59m`, for the lines of `certs renew` and `certs check`.
fn time_left(expires: std::time::SystemTime) -> String {
    let minutes = expires.duration_since(std::time::SystemTime::now()).map_or(0, |d| d.as_secs() / 60);
    format!("{}h{:02}m", minutes / 60, minutes % 60)
}

/// `tandem certs renew`: one pass, or one every `--every` until stopped (a failed pass is
/// reported and tried again then).
pub async fn certs_renew(global: &Global, renew: CertsRenewArgs) -> Result<(), CliError> {
    let ids = renew
        .app_ids
        .iter()
        .map(|app_id| spiffe_id(&renew.svid.trust_domain, &global.namespace, app_id))
        .collect::<Result<Vec<_>, _>>()?;
    let plan = certs::RenewPlan {
        root_dir: renew.svid.dir,
        root_ttl: renew.root_ttl,
        out: renew.out,
        ids,
        ttl: renew.svid.ttl,
        owner: renew.owner,
    };
    loop {
        match certs::renew(&plan) {
            Ok(done) => {
                for (id, renewal) in done {
                    match renewal {
                        certs::Renewal::Kept { expires } => {
                            println!("kept {id}: valid for {}", time_left(expires))
                        }
                        certs::Renewal::Issued { reason, expires } => println!(
                            "issued {id} into {}, valid for {} ({reason})",
                            plan.out.join(&id.app_id).display(),
                            time_left(expires)
                        ),
                    }
                }
            }
            Err(error) if renew.every.is_some() => eprintln!("tandem certs renew: {error}"),
            Err(error) => return Err(error),
        }
        match renew.every {
            Some(every) => tokio::time::sleep(every).await,
            None => return Ok(()),
        }
    }
}

/// `tandem certs check`.
pub fn certs_check(check: CertsCheckArgs) -> Result<(), CliError> {
    for (dir, id, expires) in certs::check(&check.out)? {
        println!("{}: {id}, valid for {}", dir.display(), time_left(expires));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_are_listed_with_their_kind_and_route() {
        let subscriber = |app: &str, streaming: bool, path: &str| tandem_sidecar::discovery::Subscriber {
            app_id: app.into(),
            path: path.into(),
            streaming,
            ..Default::default()
        };
        let mut registry = Registry { namespace: "ns".into(), ..Default::default() };
        registry.apps.insert("a".into(), Vec::new());
        registry.subscriptions.insert(
            ("pubsub".into(), "orders".into()),
            vec![subscriber("a", false, ""), subscriber("b", true, ""), subscriber("c", true, "/in")],
        );
        let table = ls_table(&registry, "http://e:1");
        assert!(table.contains("pubsub/orders                a, b (stream), c (stream) -> /in"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&ls_json(&registry)).unwrap();
        assert_eq!(json["subscriptions"][0]["apps"], json!(["a", "b", "c"]));
        assert_eq!(json["subscriptions"][0]["subscribers"][2]["streaming"], true);
        assert_eq!(json["subscriptions"][0]["subscribers"][2]["path"], "/in");
    }

    #[test]
    fn sidecar_urls_become_addresses() {
        assert_eq!(sidecar_address("http://127.0.0.1:50001").unwrap(), "127.0.0.1:50001");
        assert_eq!(sidecar_address("127.0.0.1:50001/").unwrap(), "127.0.0.1:50001");
        assert_eq!(sidecar_address("http://[::1]:7").unwrap(), "[::1]:7");
        for bad in ["https://h:1", "http://h", "h:0", "h:99999", "http://h:1/x", ":1", "ftp://h:1"] {
            let e = sidecar_address(bad).unwrap_err();
            assert_eq!(e.kind, crate::ExitKind::Usage, "{bad}");
            assert!(e.message.contains(bad), "{}", e.message);
        }
    }
}
