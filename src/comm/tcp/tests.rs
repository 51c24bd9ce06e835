//! TCP ranks (threads over loopback here; processes in the example's tests) against thread ranks.

use std::time::{Duration, Instant};

use burn::tensor::{DType, TensorData};

use super::TcpComm;
use crate::comm::{Comm, RecvOp, ReduceOp, SendOp, TensorSpec};
use crate::error::CommError;
use crate::{run_world, LocalWorldOptions};

/// Runs `f` on `n` TCP ranks (threads of this process, each with its own connections).
fn tcp_world<T: Send>(n: usize, timeout: Duration, f: impl Fn(Comm) -> T + Sync) -> Vec<T> {
    let comms = TcpComm::loopback_world(n, timeout).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn({
                    let f = &f;
                    move || f(c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn tensor(rank: usize, shape: [usize; 2], salt: f32) -> TensorData {
    let n = shape[0] * shape[1];
    let v: Vec<f32> = (0..n).map(|i| ((i as f32 + 1.0) * (rank as f32 + salt) * 0.731).sin() * 3.0).collect();
    TensorData::new(v, shape)
}

/// Every operation once, on the world and on sub-groups, with rank-dependent inputs.
fn script(c: Comm) -> Vec<TensorData> {
    let (r, n) = (c.rank(), c.size());
    let mut out = Vec::new();
    for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean] {
        out.push(c.all_reduce(tensor(r, [3, 5], 0.3), op).unwrap());
    }
    out.push(c.all_reduce(tensor(r, [2, 7], 1.1).convert_dtype(DType::BF16), ReduceOp::Sum).unwrap());
    // Large enough to be a reduce-scatter + all-gather (≥ 256 KiB, on 4 ranks), odd sizes.
    out.push(c.all_reduce(tensor(r, [257, 301], 0.4), ReduceOp::Sum).unwrap());
    out.push(c.all_reduce(tensor(r, [513, 301], 0.6).convert_dtype(DType::BF16), ReduceOp::Mean).unwrap());
    out.push(c.all_gather(tensor(r, [2, 3], 0.7), 1).unwrap());
    out.push(c.reduce_scatter(tensor(r, [4, 6], 0.2), 0, ReduceOp::Sum).unwrap());
    out.push(c.reduce_scatter(tensor(r, [3, 8], 0.9), 1, ReduceOp::Mean).unwrap());
    out.push(c.broadcast((r == 2).then(|| tensor(r, [2, 2], 0.5)), 2).unwrap());
    c.barrier().unwrap();
    let tp = c.new_group("tp", &[r / 2 * 2, r / 2 * 2 + 1]).unwrap();
    let dp = c.new_group("dp", &[r % 2, r % 2 + 2]).unwrap();
    out.push(tp.all_reduce(tensor(r, [2, 5], 2.0), ReduceOp::Sum).unwrap());
    out.push(dp.all_gather(tensor(r, [1, 4], 3.0), 0).unwrap());
    out.push(tp.reduce_scatter(tensor(r, [2, 4], 1.5), 1, ReduceOp::Sum).unwrap());
    // Point-to-point: a ring under two tags (sent in one order, received in the other), a
    // batch exchanging both directions, and a message to ourselves.
    let spec = TensorSpec { shape: vec![2, 2], dtype: DType::F32 };
    c.send(tensor(r, [2, 2], 4.0), (r + 1) % n, 1).unwrap();
    c.send(tensor(r, [2, 2], 5.0), (r + 1) % n, 2).unwrap();
    out.push(c.recv((r + n - 1) % n, 2, &spec).unwrap());
    out.push(c.recv((r + n - 1) % n, 1, &spec).unwrap());
    let peer = tp.rank() ^ 1;
    let sends = vec![SendOp { data: tensor(r, [2, 2], 6.0), peer, tag: 9 }, SendOp { data: tensor(r, [2, 2], 7.0), peer: tp.rank(), tag: 3 }];
    let recvs = [RecvOp { peer, tag: 9, spec: spec.clone() }, RecvOp { peer: tp.rank(), tag: 3, spec }];
    out.extend(tp.batch_p2p(sends, &recvs).unwrap());
    out
}

#[test]
fn every_operation_equals_the_thread_worlds_bit_for_bit() {
    let tcp = tcp_world(4, Duration::from_secs(60), script);
    let local: Vec<_> = run_world(4, LocalWorldOptions::default(), |c| Ok::<_, String>(script(c))).into_iter().map(Result::unwrap).collect();
    for (rank, (t, l)) in tcp.iter().zip(&local).enumerate() {
        assert_eq!(t.len(), l.len());
        for (i, (a, b)) in t.iter().zip(l).enumerate() {
            assert_eq!((a.shape.to_vec(), a.dtype), (b.shape.to_vec(), b.dtype), "rank {rank}, result {i}");
            assert_eq!(a.as_bytes(), b.as_bytes(), "rank {rank}, result {i}");
        }
    }
    // The inputs differ per rank, so the results above are not trivially equal.
    assert_ne!(tcp[0][6].as_bytes(), tensor(0, [2, 3], 0.7).as_bytes());
}

#[test]
fn a_world_of_one_needs_no_peer() {
    let got = tcp_world(1, Duration::from_secs(10), |c| c.all_reduce(tensor(0, [2, 2], 1.0), ReduceOp::Sum).unwrap());
    assert_eq!(got[0].as_bytes(), tensor(0, [2, 2], 1.0).as_bytes());
}

#[test]
fn mismatches_are_errors_naming_both_ranks() {
    let got = tcp_world(2, Duration::from_secs(30), |c| {
        let coll = if c.rank() == 0 { c.all_reduce(tensor(0, [1, 1], 1.0), ReduceOp::Sum).map(|_| ()) } else { c.barrier() };
        coll.unwrap_err()
    });
    for (rank, e) in got.iter().enumerate() {
        assert!(matches!(e, CommError::Mismatch { rank: r, other_rank: o, .. } if *r == rank && *o == 1 - rank), "{e}");
        assert!(e.to_string().contains("barrier #0") && e.to_string().contains("all_reduce(Sum) of [1, 1] F32 #0"), "{e}");
    }
    // Equal element counts, other shapes: refused, not reduced.
    let got = tcp_world(2, Duration::from_secs(30), |c| c.all_reduce(tensor(0, [2 + c.rank(), 3 - c.rank()], 1.0), ReduceOp::Sum).unwrap_err());
    assert!(got[0].to_string().contains("all_reduce(Sum) of [3, 2] F32 #0"), "{}", got[0]);
    let got = tcp_world(2, Duration::from_secs(30), |c| {
        if c.rank() == 0 {
            c.send(tensor(0, [2, 3], 1.0), 1, 4).map(|_| None)
        } else {
            c.recv(0, 4, &TensorSpec { shape: vec![3, 2], dtype: DType::F32 }).map(Some)
        }
    });
    let e = got[1].as_ref().unwrap_err();
    assert!(matches!(e, CommError::P2pMismatch { sender: 0, receiver: 1, .. }), "{e}");
}

#[test]
fn a_rank_that_is_gone_is_named_at_once() {
    let start = Instant::now();
    let got = tcp_world(3, Duration::from_secs(120), |c| {
        if c.rank() == 2 {
            // Sends one tensor, then its process "dies": the connections close.
            c.send(tensor(2, [1, 2], 1.0), 0, 0).unwrap();
            return Ok(None);
        }
        let early = if c.rank() == 0 { Some(c.recv(2, 0, &TensorSpec { shape: vec![1, 2], dtype: DType::F32 })) } else { None };
        c.all_reduce(tensor(c.rank(), [2, 2], 1.0), ReduceOp::Sum).map(|_| early)
    });
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    // Each names rank 2, or the other survivor that failed first and said why (rank 2).
    for (rank, r) in got.iter().take(2).enumerate() {
        let e = r.as_ref().unwrap_err();
        assert!(matches!(e, CommError::PeerGone { rank: me, .. } if *me == rank), "{e}");
        let text = e.to_string();
        assert!(text.contains("rank 2 is gone: its connection closed (the process exited or was killed)"), "{e}");
        if !matches!(e, CommError::PeerGone { peer: 2, .. }) {
            let other = 1 - rank;
            assert!(text.contains(&format!("rank {other} is gone: ")) && text.contains(&format!("it failed: rank {other} waited")), "{e}");
        }
    }
    // What rank 2 sent before it went is still delivered.
    let got0 = tcp_world(2, Duration::from_secs(60), |c| {
        if c.rank() == 1 {
            c.send(tensor(1, [1, 3], 2.0), 0, 7).unwrap();
            return None;
        }
        std::thread::sleep(Duration::from_millis(300));
        Some(c.recv(1, 7, &TensorSpec { shape: vec![1, 3], dtype: DType::F32 }).unwrap())
    });
    assert_eq!(got0[0].as_ref().unwrap().as_bytes(), tensor(1, [1, 3], 2.0).as_bytes());
}

/// Rank 1 arrives only after rank 0 timed out: rank 0's error names it; rank 1 then finds the
/// collective abandoned (rank 0's frame is there, but must not complete it), as on threads.
#[test]
fn a_rank_that_never_arrives_times_out_naming_it_and_late_arrivals_fail() {
    let (tx, rx) = std::sync::mpsc::channel();
    let rx = std::sync::Mutex::new(rx);
    let got = tcp_world(2, Duration::from_secs(2), |c| {
        if c.rank() == 0 {
            let e = c.barrier().unwrap_err();
            tx.send(()).unwrap();
            return e;
        }
        rx.lock().unwrap().recv_timeout(Duration::from_secs(60)).expect("rank 0 never timed out");
        // Rank 0's abort was written before it returned; give our reader time to file it (an
        // abort still in flight cannot stop a collective, as no ack is awaited).
        std::thread::sleep(Duration::from_secs(1));
        c.barrier().unwrap_err()
    });
    assert!(matches!(&got[0], CommError::Timeout { rank: 0, missing, .. } if missing == &vec![1]), "{}", got[0]);
    assert!(matches!(&got[1], CommError::PeerGone { rank: 1, peer: 0, .. }), "{}", got[1]);
    assert!(got[1].to_string().contains("it abandoned this collective: it failed: timeout"), "{}", got[1]);
}

/// A tensor a frame cannot carry is the sender's error; the receiver learns why at once.
#[test]
fn an_unsendable_tensor_is_an_error_the_receiver_hears_of() {
    let got = tcp_world(2, Duration::from_secs(60), |c| {
        if c.rank() == 0 {
            let bools = TensorData::new(vec![true, false], [2]);
            return c.send(bools, 1, 0).unwrap_err();
        }
        c.recv(0, 0, &TensorSpec { shape: vec![2], dtype: DType::U8 }).unwrap_err()
    });
    assert!(matches!(&got[0], CommError::BadInput { .. }) && got[0].to_string().contains("bool tensors are not sent"), "{}", got[0]);
    assert!(got[1].to_string().contains("rank 0 is gone: it failed: ") && got[1].to_string().contains("bool tensors"), "{}", got[1]);
}

/// A rank that fails for a reason of its own (not communication) says why before it goes.
#[test]
fn an_aborting_rank_is_named_with_its_reason() {
    let got = tcp_world(3, Duration::from_secs(60), |c| {
        if c.rank() == 2 {
            c.as_any().downcast_ref::<TcpComm>().unwrap().abort("checkpoint: disk on fire");
            return None;
        }
        Some(c.barrier().unwrap_err())
    });
    for e in got.iter().take(2).map(|e| e.as_ref().unwrap()) {
        assert!(e.to_string().contains("rank 2 is gone: it failed: checkpoint: disk on fire"), "{e}");
    }
}
