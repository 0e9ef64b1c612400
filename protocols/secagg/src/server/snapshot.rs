//! A server stopped in the unmask stage, written down so that the coordinator can finish
//! the session after a restart: once a site has revealed its shares, the sum they open
//! must not be lost (a second sum of the same round could be differenced against it, so
//! sites refuse to reveal one; `docs/protocols/threat-model.md`, attack 3).
//!
//! The snapshot is everything but the masked sum and the revealed shares: the session
//! id, the advertised keys (U1), the graph nonces, the sealed shares and commitments
//! (U2), U3 and the survivor signatures (U4). The caller stores the sum
//! ([`Server::masked_sum`]) and each revealed-shares message beside it, and hands them
//! back to [`Server::resume`] and [`Server::receive_unmask`]. The encoding is
//! length-prefixed big-endian with a domain tag and a SHA-256 trailer. It holds no
//! secret: every field is something the coordinator received in the clear, or sealed
//! for a site.

use std::collections::{BTreeMap, BTreeSet};

use ring::digest;

use super::{Graph, Server, Stage, contains};
use crate::{AdvertiseKeys, Check, EncryptedShare, GraphReveal, SecAggError, Session, ShareKeys, SurvivorSignature};

const TAG: &[u8] = b"maeum/secagg/v1/server-snapshot";

fn bad(what: impl Into<String>) -> SecAggError {
    SecAggError::new(Check::Malformed, format!("server snapshot: {}", what.into()))
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn fixed(&mut self, b: &[u8; 32]) {
        self.0.extend_from_slice(b);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn list(&mut self, xs: &[u16]) {
        self.u32(xs.len() as u32);
        xs.iter().for_each(|&x| self.u16(x));
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SecAggError> {
        if self.0.len() < n {
            return Err(bad(format!("truncated in {what}")));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self, what: &str) -> Result<u16, SecAggError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, SecAggError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn fixed(&mut self, what: &str) -> Result<[u8; 32], SecAggError> {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.take(32, what)?);
        Ok(out)
    }
    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, SecAggError> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
    /// A count of items each at least `min` bytes long (so a corrupt count cannot
    /// make the reader allocate more than the input holds).
    fn count(&mut self, min: usize, what: &str) -> Result<usize, SecAggError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min) > self.0.len() {
            return Err(bad(format!("{what}: {n} items cannot fit in what is left")));
        }
        Ok(n)
    }
    fn list(&mut self, what: &str) -> Result<Vec<u16>, SecAggError> {
        let n = self.count(2, what)?;
        (0..n).map(|_| self.u16(what)).collect()
    }
}

fn keys_of<T>(m: &BTreeMap<u16, T>) -> Vec<u16> {
    m.keys().copied().collect()
}

fn sorted_subset(inner: &[u16], outer: &[u16]) -> bool {
    inner.windows(2).all(|w| w[0] < w[1]) && inner.iter().all(|&x| contains(outer, x))
}

impl Server {
    /// The masked sum over U3 (empty before any input was folded).
    pub fn masked_sum(&self) -> &[u32] {
        self.sum.as_deref().unwrap_or_default()
    }

    /// Everything but the masked sum and the revealed shares, in the unmask stage
    /// (SA-02 in any other stage).
    pub fn snapshot(&self) -> Result<Vec<u8>, SecAggError> {
        self.expect_stage(Stage::Unmask)?;
        let mut w = Writer::default();
        w.bytes(TAG);
        w.fixed(&self.session_id);
        w.u32(self.adverts.len() as u32);
        for a in self.adverts.values() {
            w.u16(a.index);
            w.fixed(&a.cipher_pk);
            w.fixed(&a.mask_pk);
            w.fixed(&a.graph_commitment);
            w.bytes(&a.signature);
        }
        w.list(&self.u1);
        w.u32(self.reveals.len() as u32);
        for r in self.reveals.values() {
            w.u16(r.index);
            w.fixed(&r.nonce);
        }
        w.u32(self.shares.len() as u32);
        for s in self.shares.values() {
            w.u16(s.index);
            w.fixed(&s.self_mask_commitment);
            w.u32(s.shares.len() as u32);
            for e in &s.shares {
                w.u16(e.from);
                w.u16(e.to);
                w.bytes(&e.ciphertext);
            }
        }
        w.list(&self.u2);
        w.list(&self.u3);
        w.u32(self.signatures.len() as u32);
        for s in self.signatures.values() {
            w.u16(s.index);
            w.bytes(&s.signature);
        }
        w.list(&self.u4);
        w.u32(self.masked_sum().len() as u32);
        let check = digest::digest(&digest::SHA256, &w.0);
        w.0.extend_from_slice(check.as_ref());
        Ok(w.0)
    }

    /// The server of `session` in the unmask stage, from its [`Server::snapshot`] and
    /// the masked sum stored beside it; revealed shares are then fed again with
    /// [`Server::receive_unmask`]. Refuses (SA-07) a snapshot that is corrupt, of
    /// another session, or inconsistent (U4 ⊆ U3 ⊆ U2 ⊆ U1, every reveal opening its
    /// commitment, a sum of the session's length).
    pub fn resume(session: Session, snapshot: &[u8], sum: Vec<u32>) -> Result<Server, SecAggError> {
        if snapshot.len() < 32 {
            return Err(bad("too short"));
        }
        let (body, check) = snapshot.split_at(snapshot.len() - 32);
        if digest::digest(&digest::SHA256, body).as_ref() != check {
            return Err(bad("its checksum does not match (the file is damaged)"));
        }
        let mut server = Server::new(session)?;
        let mut r = Reader(body);
        if r.bytes("tag")? != TAG {
            return Err(bad("not a server snapshot"));
        }
        if r.fixed("session id")? != server.session_id {
            return Err(bad("it belongs to another session"));
        }
        let sid = server.session_id;
        for _ in 0..r.count(2 + 96 + 4, "advertised keys")? {
            let index = r.u16("advertised keys")?;
            let keys = AdvertiseKeys {
                session_id: sid,
                index,
                cipher_pk: r.fixed("advertised keys")?,
                mask_pk: r.fixed("advertised keys")?,
                graph_commitment: r.fixed("advertised keys")?,
                signature: r.bytes("advertised keys")?,
            };
            server.adverts.insert(index, keys);
        }
        server.u1 = r.list("U1")?;
        for _ in 0..r.count(2 + 32, "graph reveals")? {
            let index = r.u16("graph reveals")?;
            let nonce = r.fixed("graph reveals")?;
            server.reveals.insert(index, GraphReveal { session_id: sid, index, nonce });
        }
        for _ in 0..r.count(2 + 32 + 4, "shares")? {
            let index = r.u16("shares")?;
            let self_mask_commitment = r.fixed("shares")?;
            let mut shares = Vec::new();
            for _ in 0..r.count(2 + 2 + 4, "shares")? {
                let (from, to) = (r.u16("shares")?, r.u16("shares")?);
                shares.push(EncryptedShare { from, to, ciphertext: r.bytes("shares")? });
            }
            server.shares.insert(index, ShareKeys { session_id: sid, index, self_mask_commitment, shares });
        }
        server.u2 = r.list("U2")?;
        server.u3 = r.list("U3")?;
        for _ in 0..r.count(2 + 4, "survivor signatures")? {
            let index = r.u16("survivor signatures")?;
            let signature = r.bytes("survivor signatures")?;
            server.signatures.insert(index, SurvivorSignature { session_id: sid, index, signature });
        }
        server.u4 = r.list("U4")?;
        let len = r.u32("sum length")? as usize;
        if !r.0.is_empty() {
            return Err(bad("bytes after the end"));
        }
        let all: Vec<u16> = (1..=server.session.n() as u16).collect();
        let consistent = keys_of(&server.adverts) == server.u1
            && keys_of(&server.shares) == server.u2
            && keys_of(&server.signatures) == server.u4
            && sorted_subset(&server.u1, &all)
            && sorted_subset(&server.u2, &server.u1)
            && sorted_subset(&server.u3, &server.u2)
            && sorted_subset(&server.u4, &server.u3)
            && server.u4.len() >= server.threshold;
        if !consistent {
            return Err(bad("its party sets are inconsistent (U4 ⊆ U3 ⊆ U2 ⊆ U1 with t signers)"));
        }
        if server.session.params.degree > 0 {
            if keys_of(&server.reveals) != server.u1 {
                return Err(bad("the graph reveals do not cover U1"));
            }
            for rv in server.reveals.values() {
                let committed = server.adverts.get(&rv.index).map(|a| a.graph_commitment);
                if committed != Some(crate::crypto::graph_commitment(&sid, rv.index, &rv.nonce)) {
                    return Err(bad(format!("party {}'s graph nonce does not open its commitment", rv.index)));
                }
            }
            let nonces: Vec<(u16, [u8; 32])> = server.reveals.values().map(|r| (r.index, r.nonce)).collect();
            let seed = crate::crypto::graph_seed(&sid, &nonces);
            server.graph = Graph::new(server.session.n(), server.session.params.degree, &seed);
        }
        if len != sum.len() || sum.len() as u64 != server.session.params.vector_len {
            return Err(bad(format!(
                "a masked sum of {} words; the snapshot says {len} and the session {}",
                sum.len(),
                server.session.params.vector_len
            )));
        }
        server.sum = Some(sum);
        server.finished = server.u3.iter().copied().collect::<BTreeSet<u16>>();
        server.stage = Stage::Unmask;
        Ok(server)
    }
}
