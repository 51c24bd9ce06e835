//! `NcclComm` over the NCCL emulator (CPU threads, NCCL's matching and completion rules): its
//! host-data collectives equal the local backend's for 4 ranks and every dtype NCCL reduces, and
//! point-to-point mismatches are clear errors on both sides. (The parity suites also run over it:
//! `BURN_PARALLEL_TEST_COMM=nccl-emu cargo test --features cuda --test pipeline ...`.)
#![cfg(feature = "cuda")]

use std::time::Duration;

use burn::tensor::{DType, Tensor, TensorData};
use burn_parallel::{Comm, CommError, LocalWorld, NcclComm, RecvOp, ReduceOp, SendOp, TensorSpec};

fn on_threads<T: Send>(comms: Vec<Comm>, f: impl Fn(Comm) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| comms.into_iter().map(|c| s.spawn(move || f(c))).collect::<Vec<_>>().into_iter().map(|h| h.join().unwrap()).collect())
}

fn data(rank: usize, dtype: DType) -> TensorData {
    let v: Vec<f32> = (0..4 * 6 * 8).map(|i| ((i * 7 + rank * 13) % 17) as f32 * 0.25 - 2.0).collect();
    let t = Tensor::<burn::backend::Flex, 1>::from_data(TensorData::new(v, [4 * 6 * 8]), &Default::default()).cast(dtype).into_data();
    TensorData::from_bytes_vec(t.as_bytes().to_vec(), [4, 6, 8], dtype)
}

type Op = fn(&Comm, TensorData) -> Result<TensorData, CommError>;

#[test]
fn collectives_equal_the_local_backend() {
    let ops: Vec<(&str, Op)> = vec![
        ("all_reduce sum", |c, d| c.all_reduce(d, ReduceOp::Sum)),
        ("all_reduce max", |c, d| c.all_reduce(d, ReduceOp::Max)),
        ("all_reduce mean", |c, d| c.all_reduce(d, ReduceOp::Mean)),
        ("all_gather 0", |c, d| c.all_gather(d, 0)),
        ("all_gather 2", |c, d| c.all_gather(d, 2)),
        ("reduce_scatter 0", |c, d| c.reduce_scatter(d, 0, ReduceOp::Sum)),
        ("reduce_scatter 2", |c, d| c.reduce_scatter(d, 2, ReduceOp::Sum)),
        ("broadcast 2", |c, d| c.broadcast(Some(d), 2)),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (name, op) in &ops {
            let nccl = on_threads(NcclComm::emulated_world(4, Duration::from_secs(20)), |c| op(&c, data(c.rank(), dtype)).unwrap());
            let local = LocalWorld::new(4);
            let want = on_threads((0..4).map(|r| local.communicator(r)).collect(), |c| op(&c, data(c.rank(), dtype)).unwrap());
            for (r, (a, b)) in nccl.iter().zip(&want).enumerate() {
                assert_eq!((a.shape.as_slice(), a.dtype, a.as_bytes()), (b.shape.as_slice(), b.dtype, b.as_bytes()), "{name} {dtype:?} rank {r}");
            }
        }
    }
}

#[test]
fn ring_exchange_groups_and_p2p_mismatches() {
    let comms = NcclComm::emulated_world(3, Duration::from_secs(2));
    let out = on_threads(comms, |c| {
        let (r, n) = (c.rank(), c.size());
        let spec = TensorSpec { shape: vec![4, 6, 8], dtype: DType::F32 };
        // A ring in one group: send to the next, receive from the previous.
        let got = c
            .batch_p2p(vec![SendOp { data: data(r, DType::F32), peer: (r + 1) % n, tag: 1 }], &[RecvOp { peer: (r + n - 1) % n, tag: 1, spec: spec.clone() }])
            .unwrap();
        assert_eq!(got[0].as_bytes(), data((r + n - 1) % n, DType::F32).as_bytes());
        // Same bytes, another shape: a P2pMismatch on the receiver; the sender completes.
        let wrong = TensorSpec { shape: vec![8, 6, 4], dtype: DType::F32 };
        let shape_err = match r {
            0 => c.send(data(0, DType::F32), 1, 2).err(),
            1 => c.recv(0, 2, &wrong).err(),
            _ => None,
        };
        // Another size: the receiver reports the mismatch it read in the header, and its
        // communicator is unusable afterwards (the pair's messages may be out of step). (Here
        // the sender times out too; on real NCCL it may complete.)
        let small = TensorSpec { shape: vec![2], dtype: DType::F32 };
        let size_err = match r {
            0 => c.send(data(0, DType::F32), 2, 3).err(),
            2 => {
                let e = c.recv(0, 3, &small).err();
                let after = c.all_reduce(data(2, DType::F32), ReduceOp::Sum).unwrap_err().to_string();
                assert!(after.contains("aborted after an earlier failure"), "{after}");
                e
            }
            _ => None,
        };
        (shape_err.map(|e| e.to_string()), size_err.map(|e| e.to_string()))
    });
    assert!(out[1].0.as_deref().is_some_and(|e| e.contains("p2p mismatch: rank 0 sent [4, 6, 8] F32 but rank 1 expected [8, 6, 4] F32")), "{:?}", out[1]);
    assert!(out[0].0.is_none());
    assert!(out[2].1.as_deref().is_some_and(|e| e.contains("rank 0 sent [4, 6, 8] F32 but rank 2 expected [2] F32")), "{:?}", out[2]);
    // The stalled sender times out naming the group it waited in (its header and payload to 2).
    assert!(out[0].1.as_deref().is_some_and(|e| e.contains("timeout") && e.contains("rank 0 waited in p2p[→2 →2]")), "{:?}", out[0]);
}
