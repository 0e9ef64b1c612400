//! The coordinator's checks on what a site sends, exercised by a hand-driven site: one
//! enrolled identity speaks the fleet protocol directly, so the test can send what a
//! well-behaved agent never would.

use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;

use maeum_e2e::{Federation, SMALL_MODEL};
use maeum_protocols::job::JobSpec;
use maeum_protocols::wire::{self, Digest, TrainTask, UploadHeader, Work, pb};

type Client = pb::fleet_client::FleetClient<Channel>;

async fn connect(fed: &Federation, site: &str) -> Client {
    maeum_e2e::site_client(fed, site).await
}

/// Heartbeats every 0.5 s until aborted, so the hand-driven site stays online.
fn heartbeats(c: &Client) -> tokio::task::JoinHandle<()> {
    let mut hb = c.clone();
    tokio::spawn(async move {
        loop {
            let _ = hb.heartbeat(pb::SiteStatus::default()).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Polls (heartbeating meanwhile) until `pick` accepts a work item.
async fn poll_until<T>(c: &mut Client, mut pick: impl FnMut(Work) -> Option<T>) -> T {
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(tokio::time::Instant::now() < until, "no matching work");
        let w = c.poll(pb::PollRequest { status: None, wait_ms: 1000 }).await.expect("poll").into_inner();
        if let Some(t) = pick(Work::try_from(w).expect("well-formed work")) {
            return t;
        }
    }
}

fn header(t: &TrainTask, num_params: u64, payload: &[u8]) -> UploadHeader {
    t.upload_header(num_params, 10, Digest::of(payload), false)
}

/// How a test upload misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Good,
    CorruptChunk,
    /// Stop after two 64 KiB chunks, as a dropped connection would.
    StopEarly,
}

async fn upload(
    c: &mut Client,
    h: &UploadHeader,
    payload: &[u8],
    mode: Mode,
) -> Result<pb::UploadState, tonic::Status> {
    let state = c.begin_upload(pb::UploadHeader::from(h)).await?.into_inner();
    let mut chunks = Vec::new();
    let mut offset = state.confirmed as usize;
    let size = if mode == Mode::StopEarly { 64 << 10 } else { wire::CHUNK_SIZE };
    while offset < payload.len() && !(mode == Mode::StopEarly && chunks.len() == 2) {
        let end = (offset + size).min(payload.len());
        let c = wire::chunk(offset as u64, payload[offset..end].to_vec());
        let sha256 = if mode == Mode::CorruptChunk { Digest::of(b"not this").hex() } else { c.sha256 };
        chunks.push(pb::UploadChunk { upload_id: state.upload_id.clone(), offset: c.offset, data: c.data, sha256 });
        offset = end;
    }
    Ok(c.upload(tokio_stream::iter(chunks)).await?.into_inner())
}

#[test]
fn updates_with_a_wrong_layout_a_replayed_round_or_a_corrupt_chunk_are_rejected() {
    let mut fed = Federation::new(3);
    fed.start_coordinator();
    // This test speaks the plaintext update path by hand, so the job turns secure
    // aggregation off (masked inputs are covered by tests/tests/secagg.rs), and the
    // sites opt in to plaintext jobs (their policy refuses them by default).
    for s in ["site-1", "site-2"] {
        fed.set_policy(s, "allow_plaintext", "true");
        fed.start_site(s);
    }
    let id = fed.submit(
        "checks",
        2,
        3,
        &format!("{SMALL_MODEL}\n[secure_aggregation]\ninsecure_plaintext_aggregation_for_debugging = true\n"),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = connect(&fed, "site-3").await;
        let beat = heartbeats(&c);
        let spec = poll_until(&mut c, |w| match w {
            Work::Offer { job_id, spec_json, .. } if job_id == id => Some(spec_json),
            _ => None,
        })
        .await;
        let n = JobSpec::from_json(&spec).expect("spec").model_spec().expect("model").layout().numel() as u64;
        c.decide_job(pb::JobDecision { job_id: id.clone(), accept: true, reason: String::new() })
            .await
            .expect("decide");
        let round1 = poll_until(&mut c, |w| match w {
            Work::Train(t) if t.round == 1 => Some(t),
            _ => None,
        })
        .await;
        let zeros = vec![0u8; n as usize * 4];

        let mut wrong = header(&round1, n, &zeros);
        wrong.layout_digest = Digest::of(b"some other model");
        let e = c.begin_upload(pb::UploadHeader::from(&wrong)).await.expect_err("wrong layout must be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("does not match the round's layout"), "{}", e.message());

        let short = header(&round1, n - 1, &zeros[4..]);
        let e = c.begin_upload(pb::UploadHeader::from(&short)).await.expect_err("wrong size must be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

        let good = header(&round1, n, &zeros);
        let e = upload(&mut c, &good, &zeros, Mode::CorruptChunk).await.expect_err("corrupt chunk must be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("SHA-256"), "{}", e.message());

        // An interrupted upload resumes from the last confirmed chunk.
        let part = upload(&mut c, &good, &zeros, Mode::StopEarly).await.expect("first part");
        assert!(!part.complete);
        assert_eq!(part.confirmed, 2 * 65536);
        let again = c.begin_upload(pb::UploadHeader::from(&good)).await.expect("resume").into_inner();
        assert_eq!(again.confirmed, 2 * 65536, "the coordinator kept the confirmed bytes");
        let done = upload(&mut c, &good, &zeros, Mode::Good).await.expect("valid update");
        assert!(done.complete);
        let e = c.begin_upload(pb::UploadHeader::from(&good)).await.expect_err("second update must be refused");
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

        let round2 = poll_until(&mut c, |w| match w {
            Work::Train(t) if t.round == 2 => Some(t),
            _ => None,
        })
        .await;
        let e = c.begin_upload(pb::UploadHeader::from(&good)).await.expect_err("replayed round must be refused");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("stale update"), "{}", e.message());
        let fresh = header(&round2, n, &zeros);
        let mut nan = zeros.clone();
        nan[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = upload(&mut c, &header(&round2, n, &nan), &nan, Mode::Good).await.expect_err("NaN must be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("value 10 is not a finite number"), "{}", e.message());
        assert!(upload(&mut c, &fresh, &zeros, Mode::Good).await.expect("round 2 update").complete);
        beat.abort();
    });
    let job = fed.wait_job(&id, Duration::from_secs(180));
    assert_eq!(job["state"], "completed", "{job:#}");
    let log = fed.log_text("coordinator");
    assert!(log.contains("update refused"), "refusals are logged");
}

#[test]
fn a_200_mb_model_moves_between_coordinator_and_sites() {
    let mut fed = Federation::new(2);
    fed.start_coordinator();
    for s in ["site-1", "site-2"] {
        // Two sites: below the default cohort floor of 3, so the sites allow it.
        fed.set_policy(s, "min_cohort", "2");
        fed.start_site(s);
    }
    // 2^20 buckets × 48 dimensions ≈ 50.3 M parameters ≈ 201 MB per transfer.
    let model = "[model]\nkind = \"text-classifier\"\nbuckets = 1048576\nembed_dim = 48\nhidden = 16\n";
    let id = fed.submit("large", 1, 2, model);
    let job = fed.wait_job(&id, Duration::from_secs(300));
    assert_eq!(job["state"], "completed", "{job:#}\n{}", fed.log_text("coordinator"));
    let digest = job["history"][0]["model"].as_str().expect("model");
    let size = std::fs::metadata(fed.coordinator_home().join("blobs").join(digest)).expect("blob").len();
    assert!(size > 200_000_000, "model is only {size} bytes");
    assert_eq!(job["history"][0]["contributors"].as_array().map(Vec::len), Some(2));
}

/// A site that stops reading its download, or stops sending its upload, holds a
/// transfer slot and a stream only until the stall limit (60 s; 1.5 s here through a
/// fault-injection hook): the coordinator ends both and says so in its log; the
/// download resumes from where it broke off and makes the model, digest and all. One
/// site may not hold more than 2 downloads open.
#[test]
fn a_stalled_download_and_a_stalled_upload_are_ended() {
    let mut fed = Federation::new(3);
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_TEST_TRANSFER_STALL_MS", "1500")]);
    for s in ["site-1", "site-2"] {
        fed.set_policy(s, "allow_plaintext", "true");
        fed.set_policy(s, "allowed_models", "[\"adapter-stand-in\"]");
        fed.start_site(s);
    }
    // 80 MB: more than the HTTP/2 windows, socket buffers and read-ahead hold, so a
    // site that reads nothing blocks the coordinator's sender.
    let job = "[model]\nkind = \"adapter-stand-in\"\nparams = 20000000\n\
               [secure_aggregation]\ninsecure_plaintext_aggregation_for_debugging = true\n";
    let id = fed.submit("stall", 1, 3, job);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = connect(&fed, "site-3").await;
        let beat = heartbeats(&c);
        poll_until(&mut c, |w| matches!(w, Work::Offer { ref job_id, .. } if *job_id == id).then_some(())).await;
        c.decide_job(pb::JobDecision { job_id: id.clone(), accept: true, reason: String::new() })
            .await
            .expect("decide");
        let t = poll_until(&mut c, |w| match w {
            Work::Train(t) => Some(t),
            _ => None,
        })
        .await;
        let request = |offset| pb::DownloadRequest { digest: t.model.digest.hex(), offset };
        let received = |mut s: tonic::Streaming<pb::Chunk>, mut bytes: Vec<u8>| async move {
            while let Ok(Some(chunk)) = s.message().await {
                wire::check_chunk(bytes.len() as u64, t.model.size, chunk.offset, &chunk.data, &chunk.sha256)
                    .expect("a sound chunk");
                bytes.extend_from_slice(&chunk.data);
            }
            bytes
        };

        // Reading nothing for 4 s: the coordinator gives up on this download.
        let stalled = c.download(request(0)).await.expect("download").into_inner();
        // Nor can one site hold the slots the fleet shares: a third open download is refused.
        let second = c.download(request(0)).await.expect("a second download").into_inner();
        let e = c.download(request(0)).await.expect_err("a third download");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("2 downloads open"), "{}", e.message());
        drop(second);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let part = received(stalled, Vec::new()).await;
        assert!((part.len() as u64) < t.model.size, "a stalled download was served in full ({} bytes)", part.len());
        // The slot is free again, and the download resumes where it broke off, here a
        // little before (off the 1 MiB piece boundary, as after a partial write): the
        // pieces make the model, digest and all.
        let mut part = part;
        part.truncate(part.len().saturating_sub(1000));
        let at = part.len() as u64;
        let whole = received(c.download(request(at)).await.expect("resume").into_inner(), part).await;
        assert_eq!(whole.len() as u64, t.model.size);
        assert_eq!(Digest::of(&whole), t.model.digest, "a resumed download is the model");

        // An upload that sends one chunk and then nothing, with its stream held open.
        let n = 20_000_000 + fed.labels.len() as u64;
        let h = t.upload_header(n, 10, Digest::of(b"never sent in full"), false);
        let state = c.begin_upload(pb::UploadHeader::from(&h)).await.expect("begin").into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let first = wire::chunk(0, vec![0u8; 65536]);
        tx.send(pb::UploadChunk { upload_id: state.upload_id, offset: 0, data: first.data, sha256: first.sha256 })
            .await
            .expect("first chunk");
        let sending = c.upload(tokio_stream::wrappers::ReceiverStream::new(rx));
        let e = tokio::time::timeout(Duration::from_secs(20), sending)
            .await
            .expect("the coordinator ends a stalled upload")
            .expect_err("a stalled upload is refused");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert!(e.message().contains("sent no data"), "{}", e.message());
        drop(tx);
        beat.abort();
    });
    let log = fed.log_text("coordinator");
    assert!(log.contains("model download stalled"), "{log}");
}
