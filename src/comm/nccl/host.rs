//! [`Communicator`] for [`NcclComm`] on host tensors, staged through device buffers.

use std::sync::Arc;

use super::*;

impl NcclComm {
    /// Uploads `data`, runs `op(src, dst)` with a `dst_bytes` output buffer, downloads it.
    fn staged(&self, data: &TensorData, dst_bytes: usize, op: impl FnOnce(u64, u64) -> Result<(), CommError>) -> Result<Vec<u8>, CommError> {
        let src = self.alloc_upload(data.as_bytes())?;
        let dst = self.alloc(dst_bytes)?;
        op(self.ptr(&src), self.ptr(&dst))?;
        let mut out = self.download(&dst)?;
        out.truncate(dst_bytes);
        Ok(out)
    }

    fn check_dtype(&self, op: &str, dtype: DType) -> Result<(), CommError> {
        nccl_dtype(dtype).map(|_| ()).map_err(|d| self.bad(op, d))
    }

    /// The first received header that is not what `recvs` expect, as an error.
    pub(crate) fn check_received(&self, got: &[Header], recvs: &[RecvOp]) -> Result<(), CommError> {
        let me = self.global_rank();
        for (h, r) in got.iter().zip(recvs) {
            let src = self.global_ranks[r.peer];
            if h.tag != r.tag {
                return Err(CommError::Mismatch {
                    group: self.label.clone(),
                    rank: me,
                    op: format!("recv(from={src}, tag={})", r.tag),
                    other_rank: src,
                    other_op: format!("send(tag={}) (point-to-point matches in order under NCCL)", h.tag),
                });
            }
            if h.shape != r.spec.shape || h.dtype != r.spec.dtype {
                return Err(CommError::P2pMismatch {
                    sender: src,
                    receiver: me,
                    sent_shape: h.shape.clone(),
                    sent_dtype: format!("{:?}", h.dtype),
                    expected_shape: r.spec.shape.clone(),
                    expected_dtype: format!("{:?}", r.spec.dtype),
                });
            }
        }
        Ok(())
    }

    /// Sends one byte string from group rank `from` to every other member of `to` (for ids).
    fn spread_bytes(&self, bytes: Option<Vec<u8>>, from: usize, to: &[usize], len: usize) -> Result<Vec<u8>, CommError> {
        let me = self.rank;
        let spec = TensorSpec { shape: vec![len], dtype: DType::U8 };
        if me == from {
            let data = TensorData::from_bytes_vec(bytes.expect("sender has the bytes"), [len], DType::U8);
            for &peer in to.iter().filter(|p| **p != me) {
                self.batch_p2p(vec![SendOp { data: data.clone(), peer, tag: u64::MAX }], &[])?;
            }
            Ok(data.as_bytes().to_vec())
        } else {
            let got = self.batch_p2p(Vec::new(), &[RecvOp { peer: from, tag: u64::MAX, spec }])?;
            Ok(got[0].as_bytes().to_vec())
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.global_ranks.len()
    }

    fn global_ranks(&self) -> &[usize] {
        &self.global_ranks
    }

    fn label(&self) -> &str {
        &self.label
    }

    fn all_reduce(&self, data: TensorData, op: ReduceOp) -> Result<TensorData, CommError> {
        self.count_host_call();
        self.check_dtype("all_reduce", data.dtype)?;
        let n = data.as_bytes().len();
        // SAFETY: staged buffers of n bytes each.
        let out = self.staged(&data, n, |s, d| unsafe { self.all_reduce_raw(s, d, data.num_elements(), data.dtype, op) })?;
        Ok(TensorData::from_bytes_vec(out, data.shape.clone(), data.dtype))
    }

    fn all_gather(&self, data: TensorData, dim: usize) -> Result<TensorData, CommError> {
        self.count_host_call();
        self.check_dtype("all_gather", data.dtype)?;
        if dim >= data.shape.num_dims() {
            return Err(self.bad("all_gather", format!("dim {dim} out of range for shape {:?}", data.shape.as_slice())));
        }
        let (n, size) = (data.as_bytes().len(), self.size());
        // SAFETY: n-byte source, size×n-byte destination.
        let out = self.staged(&data, n * size, |s, d| unsafe { self.all_gather_raw(s, d, data.num_elements(), data.dtype) })?;
        let parts: Vec<TensorData> = out.chunks(n.max(1)).take(size).map(|c| TensorData::from_bytes_vec(c.to_vec(), data.shape.clone(), data.dtype)).collect();
        let refs: Vec<&TensorData> = parts.iter().collect();
        concat_along(&refs, dim).map_err(|d| self.bad("all_gather", d))
    }

    fn reduce_scatter(&self, data: TensorData, dim: usize, op: ReduceOp) -> Result<TensorData, CommError> {
        self.count_host_call();
        self.check_dtype("reduce_scatter", data.dtype)?;
        let size = self.size();
        let chunks = (0..size).map(|i| split_along(&data, dim, size, i)).collect::<Result<Vec<_>, _>>().map_err(|d| self.bad("reduce_scatter", d))?;
        let (shape, count) = (chunks[0].shape.clone(), chunks[0].num_elements());
        let flat: Vec<u8> = chunks.iter().flat_map(|c| c.as_bytes().to_vec()).collect();
        let flat = TensorData::from_bytes_vec(flat, [data.num_elements()], data.dtype);
        let n = chunks[0].as_bytes().len();
        // SAFETY: size×n-byte source, n-byte destination.
        let out = self.staged(&flat, n, |s, d| unsafe { self.reduce_scatter_raw(s, d, count, data.dtype, op) })?;
        Ok(TensorData::from_bytes_vec(out, shape, data.dtype))
    }

    fn broadcast(&self, data: Option<TensorData>, root: usize) -> Result<TensorData, CommError> {
        self.count_host_call();
        if root >= self.size() {
            return Err(self.bad("broadcast", format!("root {root} outside a group of {}", self.size())));
        }
        let mine = if self.rank == root { Some(data.ok_or_else(|| self.bad("broadcast", format!("root {root} passed no tensor")))?) } else { None };
        let header = mine.as_ref().map(|d| Header { tag: 0, dtype: d.dtype, shape: d.shape.to_vec() });
        let words = match &header {
            Some(h) => h.encode().map_err(|d| self.bad("broadcast", d))?,
            None => [0u64; HEADER_WORDS],
        };
        let words = TensorData::new(words.to_vec(), [HEADER_WORDS]);
        // SAFETY: staged buffers of HEADER_WORDS u64 each.
        let got = self.staged(&words, HEADER_WORDS * 8, |s, d| unsafe { self.broadcast_raw(s, d, HEADER_WORDS, DType::U64, root) })?;
        let w: Vec<u64> = got.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        let h = Header::decode(&w).map_err(|d| self.bad("broadcast", d))?;
        let payload = mine.unwrap_or_else(|| TensorData::from_bytes_vec(vec![0; h.bytes()], h.shape.clone(), h.dtype));
        // SAFETY: staged buffers of the announced size.
        let out = self.staged(&payload, h.bytes(), |s, d| unsafe { self.broadcast_raw(s, d, h.bytes(), DType::U8, root) })?;
        Ok(TensorData::from_bytes_vec(out, h.shape, h.dtype))
    }

    fn send(&self, data: TensorData, peer: usize, tag: u64) -> Result<(), CommError> {
        self.batch_p2p(vec![SendOp { data, peer, tag }], &[]).map(|_| ())
    }

    fn recv(&self, peer: usize, tag: u64, expect: &TensorSpec) -> Result<TensorData, CommError> {
        Ok(self.batch_p2p(Vec::new(), &[RecvOp { peer, tag, spec: expect.clone() }])?.remove(0))
    }

    fn batch_p2p(&self, sends: Vec<SendOp>, recvs: &[RecvOp]) -> Result<Vec<TensorData>, CommError> {
        self.count_host_call();
        let send_bufs = sends.iter().map(|s| self.alloc_upload(s.data.as_bytes())).collect::<Result<Vec<_>, _>>()?;
        let recv_bufs = recvs.iter().map(|r| self.alloc(r.spec.shape.iter().product::<usize>() * r.spec.dtype.size())).collect::<Result<Vec<_>, _>>()?;
        let s_ops: Vec<(u64, Header, usize)> = sends
            .iter()
            .zip(&send_bufs)
            .map(|(s, b)| (self.ptr(b), Header { tag: s.tag, dtype: s.data.dtype, shape: s.data.shape.to_vec() }, s.peer))
            .collect();
        let r_ops: Vec<(u64, &RecvOp)> = recvs.iter().zip(&recv_bufs).map(|(r, b)| (self.ptr(b), r)).collect();
        self.p2p_checked(&s_ops, &r_ops)?;
        recvs
            .iter()
            .zip(&recv_bufs)
            .map(|(r, b)| {
                let mut bytes = self.download(b)?;
                bytes.truncate(r.spec.shape.iter().product::<usize>() * r.spec.dtype.size());
                Ok(TensorData::from_bytes_vec(bytes, r.spec.shape.clone(), r.spec.dtype))
            })
            .collect()
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.all_reduce(TensorData::new(vec![0.0f32], [1]), ReduceOp::Sum).map(|_| ())
    }

    /// The first member creates an id and sends it to the others over this communicator; the
    /// members then create the NCCL communicator together (only members take part).
    fn new_group(&self, name: &str, global_ranks: &[usize]) -> Result<Comm, CommError> {
        let me = self.global_rank();
        let mut seen = std::collections::HashSet::new();
        if let Some(d) = global_ranks.iter().find(|r| !seen.insert(**r)) {
            return Err(CommError::InvalidGroup(format!("{name}: rank {d} listed twice in {global_ranks:?}")));
        }
        let members = global_ranks
            .iter()
            .map(|g| {
                self.global_ranks
                    .iter()
                    .position(|r| r == g)
                    .ok_or_else(|| CommError::InvalidGroup(format!("{name}: rank {g} is not in the parent group {}", self.label)))
            })
            .collect::<Result<Vec<usize>, _>>()?;
        let rank = global_ranks
            .iter()
            .position(|&r| r == me)
            .ok_or_else(|| CommError::InvalidGroup(format!("{name}: rank {me} creates {global_ranks:?} without being in it")))?;
        let id = if rank == 0 { Some(self.t.new_id()?.to_vec()) } else { None };
        let id: [u8; 128] = self.spread_bytes(id, members[0], &members, 128)?.try_into().map_err(|_| self.bad("new_group", "id of the wrong size".into()))?;
        let label = format!("{name}[{}]", global_ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","));
        let t = self.t.join(&id, rank, global_ranks.len(), OpInfo::new(&label, global_ranks, rank))?;
        Ok(Arc::new(NcclComm::with_transport(t, rank, global_ranks.to_vec(), label, self.options.clone())))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
