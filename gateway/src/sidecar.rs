//! Side effects that leave the box: registration codes (SMS) and push notifications.
//!
//! Shards never block on them: they `try_send` a job to one worker thread through a bounded
//! crossbeam channel (a full queue drops the job and counts it in
//! `switchboard_side_effects_dropped_total`). Providers are pluggable by configuration:
//!
//! * SMS `file` (default, development): appends the code to `<data_dir>/sms/<phone>.txt` and logs
//!   it. SMS `webhook`: POSTs `{"phone": "14155550100", "code": "123456"}` as JSON.
//! * Push `log` (default): logs the request. Push `webhook`: POSTs
//!   `{"user": .., "device": .., "from": .., "msg_type": ..}`: who and what kind, never content.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crossbeam::channel::{bounded, Receiver, Sender, TrySendError};

/// Most side-effect jobs queued before new ones are dropped.
pub const SIDE_EFFECT_QUEUE_MAX: usize = 65_536;

/// One job.
#[derive(Debug, Clone)]
pub enum Job {
    /// Deliver a registration code.
    Sms {
        /// Number.
        phone: u64,
        /// Code.
        code: u32,
    },
    /// Tell the push provider a device has something waiting.
    Push {
        /// Recipient.
        user: u64,
        /// Its device.
        device: u16,
        /// Sender.
        from_user: u64,
        /// Message type.
        msg_type: u8,
    },
    /// Change the media store (status post ACLs and deletions).
    Media(MediaJob),
}

/// A media store change decided by a shard (status posts), done off the shards' cores.
#[derive(Debug, Clone)]
pub enum MediaJob {
    /// Restrict downloads of these blobs to these users.
    Acl {
        /// SHA-256 of each blob.
        blobs: Vec<[u8; 32]>,
        /// Who may download them.
        users: Vec<u64>,
    },
    /// Delete these blobs.
    Delete {
        /// SHA-256 of each blob.
        blobs: Vec<[u8; 32]>,
    },
}

/// Where jobs go.
#[derive(Debug, Clone)]
pub struct Providers {
    /// `file` or `webhook`.
    pub sms: String,
    /// Webhook URL for SMS.
    pub sms_url: String,
    /// `log` or `webhook`.
    pub push: String,
    /// Webhook URL for push.
    pub push_url: String,
    /// Data directory (file SMS provider).
    pub data_dir: PathBuf,
}

/// Handle shards use to queue jobs.
#[derive(Clone, Debug)]
pub struct Sidecar {
    tx: Sender<Job>,
}

impl Sidecar {
    /// Starts the worker thread.
    pub fn spawn(p: Providers) -> std::io::Result<(Sidecar, std::thread::JoinHandle<()>)> {
        let (tx, rx) = bounded(SIDE_EFFECT_QUEUE_MAX);
        let h = std::thread::Builder::new()
            .name("sidecar".into())
            .spawn(move || run(p, rx))?;
        Ok((Sidecar { tx }, h))
    }

    /// Queues a job; false if the queue was full (the job is dropped) or the worker is gone.
    pub fn submit(&self, job: Job) -> bool {
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

fn run(p: Providers, rx: Receiver<Job>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    for job in rx {
        match job {
            Job::Sms { phone, code } => {
                if p.sms == "webhook" {
                    let body = serde_json::json!({ "phone": phone.to_string(), "code": format!("{code:06}") });
                    if let Err(e) = agent.post(&p.sms_url).send_json(body) {
                        tracing::warn!(phone, error = %e, "sms webhook failed");
                    }
                } else {
                    tracing::info!(
                        phone,
                        code = format!("{code:06}"),
                        "registration code (file SMS provider)"
                    );
                    let dir = p.data_dir.join("sms");
                    let res = std::fs::create_dir_all(&dir).and_then(|_| {
                        let mut f = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(dir.join(format!("{phone}.txt")))?;
                        writeln!(f, "{code:06}")
                    });
                    if let Err(e) = res {
                        tracing::warn!(phone, error = %e, "writing sms code file failed");
                    }
                }
            }
            Job::Media(job) => media_job(&p, job),
            Job::Push {
                user,
                device,
                from_user,
                msg_type,
            } => {
                if p.push == "webhook" {
                    let body = serde_json::json!({ "user": user, "device": device, "from": from_user, "msg_type": msg_type });
                    if let Err(e) = agent.post(&p.push_url).send_json(body) {
                        tracing::warn!(user, error = %e, "push webhook failed");
                    }
                } else {
                    tracing::debug!(
                        user,
                        device,
                        from_user,
                        msg_type,
                        "push notification (log provider)"
                    );
                }
            }
        }
    }
}

/// Applies a media store change. Failures are logged; the shard announces ACLs again after
/// every restart and a blob's own TTL bounds a failed deletion.
fn media_job(p: &Providers, job: MediaJob) {
    let store = match storage::blob::BlobStore::open(&p.data_dir.join("media")) {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "opening the media store failed"),
    };
    match job {
        MediaJob::Acl { blobs, users } => {
            for b in &blobs {
                if let Err(e) = store.set_acl(b, &users) {
                    tracing::warn!(error = %e, "writing a media ACL failed");
                }
            }
        }
        MediaJob::Delete { blobs } => {
            for b in &blobs {
                match store.delete_blob(b) {
                    Ok(bytes) => {
                        tracing::info!(bytes, blob = %storage::blob::hex(b), "status blob deleted")
                    }
                    Err(e) => tracing::warn!(error = %e, "deleting a status blob failed"),
                }
            }
        }
    }
}
