//! `shoal keygen`: a swarm key or a node identity.

use std::io::Write;

/// `shoal keygen`: a new random swarm key, in the usual `swarm.key` format.
pub fn keygen(args: crate::args::KeygenArgs) -> anyhow::Result<()> {
    use std::io::ErrorKind;
    let identity = libp2p::identity::Keypair::generate_ed25519();
    let key = libp2p::pnet::PreSharedKey::new(rand::random());
    let out = args.out.clone().unwrap_or_else(|| {
        if args.identity {
            "node.key"
        } else {
            "swarm.key"
        }
        .into()
    });
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if args.force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&out).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => anyhow::anyhow!(
            "{} exists; --force replaces it (nodes holding the old key will no longer connect)",
            out.display()
        ),
        _ => anyhow::Error::new(e).context(format!("cannot write {}", out.display())),
    })?;
    if args.identity {
        file.write_all(&identity.to_protobuf_encoding()?)?;
        println!(
            "wrote {}: peer id {} (give the file to --identity, the peer id to servers' --allow-peers)",
            out.display(),
            identity.public().to_peer_id()
        );
        return Ok(());
    }
    writeln!(file, "{key}")?;
    println!(
        "wrote {} (fingerprint {}): give it to every node of the swarm with --swarm-key",
        out.display(),
        key.fingerprint()
    );
    Ok(())
}
