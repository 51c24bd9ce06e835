//! The local communicator: collectives, point-to-point, groups, and every failure mode as a clear
//! error (never a hang).

mod common;

use std::time::{Duration, Instant};

use burn::tensor::{DType, Tensor, TensorData};
use burn_parallel::comm::ops;
use burn_parallel::{run_world, Comm, CommError, LocalWorldOptions, P2pMode, ParallelConfig, ProcessGroups, RankError, RecvOp, ReduceOp, SendOp, TensorSpec};
use common::{world, Inner};

fn vals(t: TensorData) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

fn short() -> LocalWorldOptions {
    LocalWorldOptions { timeout: Duration::from_millis(400), ..Default::default() }
}

#[test]
fn collectives_on_host_data() {
    for n in [1, 2, 4] {
        let out = world(n, |c| {
            let r = c.rank() as f32;
            let x = TensorData::new(vec![r + 1.0, 10.0 * r], [1, 2]);
            let sum = vals(c.all_reduce(x.clone(), ReduceOp::Sum).map_err(|e| e.to_string())?);
            let max = vals(c.all_reduce(x.clone(), ReduceOp::Max).map_err(|e| e.to_string())?);
            let mean = vals(c.all_reduce(x.clone(), ReduceOp::Mean).map_err(|e| e.to_string())?);
            let gathered = c.all_gather(x.clone(), 0).map_err(|e| e.to_string())?;
            let wide = TensorData::new((0..2 * c.size()).map(|i| (i + c.rank()) as f32).collect::<Vec<_>>(), [1, 2 * c.size()]);
            let rs = vals(c.reduce_scatter(wide, 1, ReduceOp::Sum).map_err(|e| e.to_string())?);
            let root = c.size() - 1;
            let b = vals(c.broadcast((c.rank() == root).then(|| x.clone()), root).map_err(|e| e.to_string())?);
            c.barrier().map_err(|e| e.to_string())?;
            Ok((sum, max, mean, gathered.shape.to_vec(), vals(gathered), rs, b))
        });
        let nf = n as f32;
        let s0: f32 = (1..=n).map(|v| v as f32).sum();
        let s1: f32 = (0..n).map(|v| 10.0 * v as f32).sum();
        for (r, (sum, max, mean, gshape, g, rs, b)) in out.into_iter().enumerate() {
            assert_eq!(sum, vec![s0, s1]);
            assert_eq!(max, vec![nf, 10.0 * (nf - 1.0)]);
            assert_eq!(mean, vec![s0 / nf, s1 / nf]);
            assert_eq!(gshape, vec![n, 2]);
            assert_eq!(g, (0..n).flat_map(|k| [k as f32 + 1.0, 10.0 * k as f32]).collect::<Vec<_>>());
            // wide[i] on rank k = i + k; summed: n*i + n(n-1)/2; rank r keeps i in [2r, 2r+2).
            let expect: Vec<f32> = (2 * r..2 * r + 2).map(|i| nf * i as f32 + nf * (nf - 1.0) / 2.0).collect();
            assert_eq!(rs, expect);
            assert_eq!(b, vec![nf, 10.0 * (nf - 1.0)]);
        }
    }
}

#[test]
fn tensor_level_collectives_and_p2p() {
    let out = world(2, |c| {
        let dev = Default::default();
        let x = Tensor::<Inner, 2>::from_floats([[c.rank() as f32 + 1.0, 2.0]], &dev);
        let s = ops::all_reduce(x.clone(), ReduceOp::Sum, &c).map_err(|e| e.to_string())?;
        let g = ops::all_gather(x.clone(), 1, &c).map_err(|e| e.to_string())?;
        let peer = 1 - c.rank();
        // An exchange between two ranks is one batch (with NCCL, two lone sends would hang).
        let mut got = ops::batch_p2p(vec![(x.clone() * 10.0, peer, 7)], &[(peer, 7, [1, 2])], &dev, &c).map_err(|e| e.to_string())?;
        Ok((s.into_data(), g.into_data(), got.remove(0).into_data()))
    });
    assert_eq!(vals(out[0].0.clone()), vec![3.0, 4.0]);
    assert_eq!(vals(out[1].1.clone()), vec![1.0, 2.0, 2.0, 2.0]);
    assert_eq!(vals(out[0].2.clone()), vec![20.0, 20.0]);
    assert_eq!(vals(out[1].2.clone()), vec![10.0, 20.0]);
}

#[test]
fn subgroups_follow_megatron_order() {
    let cfg = ParallelConfig::new().with_data_parallel(2).with_pipeline_parallel(2).with_tensor_parallel(2);
    let out = world(8, |c| {
        let g = ProcessGroups::new(cfg.clone(), c.clone()).map_err(|e| e.to_string())?;
        let me = TensorData::new(vec![c.rank() as f32], [1]);
        let tp = vals(g.tp.all_gather(me.clone(), 0).map_err(|e| e.to_string())?);
        let dp = vals(g.dp.all_gather(me.clone(), 0).map_err(|e| e.to_string())?);
        let pp = vals(g.pp.all_gather(me, 0).map_err(|e| e.to_string())?);
        Ok((g.tp.label().to_string(), tp, dp, pp))
    });
    assert_eq!(out[0].0, "tp[0,1]");
    assert_eq!(out[5].1, vec![4.0, 5.0]);
    assert_eq!(out[5].2, vec![5.0, 7.0]);
    assert_eq!(out[5].3, vec![1.0, 5.0]);
}

#[test]
fn wrong_world_size_is_a_clear_error() {
    let cfg = ParallelConfig::new().with_tensor_parallel(2).with_data_parallel(2);
    let res = run_world(3, short(), |c| ProcessGroups::new(cfg.clone(), c).map(|_| ()));
    for r in res {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("world size 3 != data_parallel 2 x context_parallel 1 x pipeline_parallel 1 x tensor_parallel 2 = 4"), "{e}");
    }
}

#[test]
fn a_rank_that_never_joins_times_out_with_names() {
    let start = Instant::now();
    // Rank 1 sleeps past the timeout instead of joining the all-reduce (it does not fail, so
    // only the timeout can end rank 0's wait).
    let res = run_world(2, short(), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(900));
            return Ok(());
        }
        c.all_reduce(TensorData::new(vec![1.0f32], [1]), ReduceOp::Sum).map(|_| ())
    });
    assert!(start.elapsed() < Duration::from_secs(10));
    match &res[0] {
        Err(RankError::Failed { rank: 0, message }) => {
            assert!(message.contains("timeout"), "{message}");
            assert!(message.contains("all_reduce(Sum) #0"), "{message}");
            assert!(message.contains("world[0,1]"), "{message}");
            assert!(message.contains("ranks [1] never arrived"), "{message}");
        }
        other => panic!("expected a timeout on rank 0, got {other:?}"),
    }
    assert!(res[1].is_ok());
}

#[test]
fn a_failed_rank_releases_its_peers_at_once() {
    let opts = LocalWorldOptions { timeout: Duration::from_secs(60), ..Default::default() };
    let start = Instant::now();
    let res = run_world(3, opts, |c| {
        if c.rank() == 2 {
            return Err("out of memory".to_string());
        }
        c.barrier().map_err(|e| e.to_string())
    });
    assert!(start.elapsed() < Duration::from_secs(10), "peers waited for the timeout");
    for r in &res[..2] {
        let e = r.as_ref().unwrap_err().to_string();
        assert!(e.contains("rank 2 is gone") && e.contains("out of memory"), "{e}");
    }
}

#[test]
fn mismatched_collectives_are_reported() {
    let res = run_world(2, short(), |c| {
        let x = TensorData::new(vec![1.0f32, 2.0], [1, 2]);
        if c.rank() == 0 {
            c.all_reduce(x, ReduceOp::Sum).map(|_| ())
        } else {
            c.all_gather(x, 0).map(|_| ())
        }
    });
    let e = res[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("collective mismatch") && e.contains("all_gather(dim=0)"), "{e}");
}

#[test]
fn p2p_shape_and_dtype_mismatch_names_both_ranks() {
    let res = run_world(2, short(), |c| {
        if c.rank() == 0 {
            c.send(TensorData::new(vec![0.0f32; 6], [2, 3]), 1, 0)?;
            c.send(TensorData::new(vec![0.0f64; 6], [2, 3]), 1, 0)?;
            Ok(())
        } else {
            let shape_err = c.recv(0, 0, &TensorSpec { shape: vec![3, 2], dtype: DType::F32 }).unwrap_err();
            let dtype_err = c.recv(0, 0, &TensorSpec { shape: vec![2, 3], dtype: DType::F32 }).unwrap_err();
            Err::<(), CommError>(CommError::Backend(format!("{shape_err}\n{dtype_err}")))
        }
    });
    let e = res[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 0 sent [2, 3] F32 but rank 1 expected [3, 2] F32"), "{e}");
    assert!(e.contains("rank 0 sent [2, 3] F64 but rank 1 expected [2, 3] F32"), "{e}");
}

#[test]
fn recv_from_a_silent_peer_times_out() {
    let res = run_world(2, short(), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(900));
            return Ok(());
        }
        c.recv(1, 0, &TensorSpec { shape: vec![1], dtype: DType::F32 }).map(|_| ())
    });
    let e = res[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("timeout") && e.contains("recv(from=1") && e.contains("ranks [1] never arrived"), "{e}");
}

#[test]
fn bad_groups_and_inputs_are_rejected() {
    let res = run_world(2, short(), |c| {
        let not_member = c.new_group("x", &[1 - c.rank()]).unwrap_err().to_string();
        let dup = c.new_group("x", &[0, 0]).unwrap_err().to_string();
        let outside = c.new_group("x", &[c.rank(), 7]).unwrap_err().to_string();
        let shape = TensorData::new(vec![0.0f32; 2 + c.rank()], [2 + c.rank()]);
        let bad = c.all_reduce(shape, ReduceOp::Sum).unwrap_err().to_string();
        Ok::<_, String>((not_member, dup, outside, bad))
    });
    let (nm, dup, out, bad) = res.into_iter().next().unwrap().unwrap();
    assert!(nm.contains("without being in it"), "{nm}");
    assert!(dup.contains("listed twice"), "{dup}");
    assert!(out.contains("rank 7 is not in the parent group"), "{out}");
    assert!(bad.contains("rank 0 has [2]") && bad.contains("rank 1 has [3]"), "{bad}");
}

/// Equal-count collectives on unequal inputs fail on thread ranks as they would on NCCL: an
/// all-gather of parts of different lengths (concatenation alone would accept it), a broadcast
/// into a tensor of another shape (the root completes; the rank that passed it gets the error).
#[test]
fn unequal_all_gather_and_broadcast_shapes_are_rejected() {
    let res = run_world(2, short(), |c| {
        let r = c.rank();
        let part = TensorData::new(vec![0.0f32; 2 * (r + 1)], [r + 1, 2]);
        let gather = c.all_gather(part, 0).unwrap_err().to_string();
        let x = Tensor::<Inner, 1>::zeros([2 + r], &Default::default());
        let bcast = ops::broadcast(x, 0, &c).map(|t| t.dims()).map_err(|e| e.to_string());
        Ok::<_, String>((gather, bcast))
    });
    let (g0, b0) = res[0].clone().unwrap();
    let (_, b1) = res[1].clone().unwrap();
    assert!(g0.contains("all_gather(dim=0)") && g0.contains("rank 0 has [1, 2] F32 but rank 1 has [2, 2] F32"), "{g0}");
    assert_eq!(b0, Ok([2]));
    let b1 = b1.unwrap_err();
    assert!(b1.contains("broadcast(root=0)") && b1.contains("root 0 sent [2] F32 but rank 1 passed [3] F32"), "{b1}");
}

#[test]
fn a_round_abandoned_after_a_timeout_fails_late_arrivals() {
    let res = run_world(2, short(), |c| {
        let x = TensorData::new(vec![1.0f32], [1]);
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(700));
            return c.all_reduce(x, ReduceOp::Sum).map(|_| String::new()).map_err(|e| e.to_string());
        }
        // Rank 0 times out, handles the error and stays alive.
        let first = c.all_reduce(x, ReduceOp::Sum).unwrap_err().to_string();
        std::thread::sleep(Duration::from_millis(900));
        Ok(first)
    });
    assert!(res[0].as_ref().unwrap().contains("timeout"));
    let e = res[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 0 is gone") && e.contains("abandoned this collective"), "{e}");
}

/// NCCL's point-to-point rules on CPU threads: two lone sends towards each other hang on NCCL, so
/// in rendezvous mode they fail with a timeout naming the rank and the send (buffered mode lets
/// them pass); a receive posted in another order than the sends is a clear mismatch.
#[test]
fn rendezvous_mode_fails_unbatched_exchange_and_reordered_messages() {
    let rendezvous = LocalWorldOptions { timeout: Duration::from_millis(400), p2p: P2pMode::Rendezvous };
    let exchange = |c: Comm| {
        let peer = 1 - c.rank();
        let spec = TensorSpec { shape: vec![1], dtype: DType::F32 };
        c.send(TensorData::new(vec![1.0f32], [1]), peer, 3)?;
        c.recv(peer, 3, &spec).map(|_| ())
    };
    for r in run_world(2, rendezvous.clone(), exchange) {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("waited in send(to=") && e.contains("waiting to be received"), "{e}");
    }
    assert!(run_world(2, short(), exchange).into_iter().all(|r| r.is_ok()));

    let reordered = run_world(2, rendezvous, |c| {
        let spec = TensorSpec { shape: vec![1], dtype: DType::F32 };
        if c.rank() == 0 {
            let sends = (0..2).map(|t| SendOp { data: TensorData::new(vec![t as f32], [1]), peer: 1, tag: t }).collect();
            c.batch_p2p(sends, &[]).map(|_| ())
        } else {
            let recvs: Vec<RecvOp> = [1, 0].into_iter().map(|tag| RecvOp { peer: 0, tag, spec: spec.clone() }).collect();
            c.batch_p2p(Vec::new(), &recvs).map(|_| ())
        }
    });
    let e = reordered[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("recv(from=0, tag=1") && e.contains("send(tag=0)") && e.contains("in order"), "{e}");
}

/// The layout changes around flat (NCCL) all-gather and reduce-scatter, on every dim: stacking
/// the parts rank-major then `rank_major_to_concat` is `concat_along`; row `i` of
/// `split_to_rank_major` is rank `i`'s `split_along` slice.
#[test]
fn flat_collective_layouts_match_concat_and_split() {
    use burn::tensor::TensorPrimitive;
    use burn_parallel::collective::layout::{rank_major_to_concat, split_to_rank_major};
    let dev = Default::default();
    let prim = |d: &TensorData| Tensor::<Inner, 4>::from_data(d.clone(), &dev).into_primitive().tensor();
    for n in [1, 2, 3] {
        for dim in 0..4 {
            let mut shape = [2, 3, 4, 5];
            shape[dim] *= n;
            let full = common::randn(&format!("full{dim}{n}"), shape);
            let parts: Vec<TensorData> = (0..n).map(|i| burn_parallel::comm::split_along(&full, dim, n, i).unwrap()).collect();
            // Gather side: the parts stacked rank-major, as NCCL leaves them.
            let stacked: Vec<f32> = parts.iter().flat_map(|p| vals(p.clone())).collect();
            let mut sdims = vec![n];
            sdims.extend(parts[0].shape.as_slice());
            let stacked = Tensor::<Inner, 5>::from_data(TensorData::new(stacked, sdims), &dev).into_primitive().tensor();
            let cat = Tensor::<Inner, 4>::from_primitive(TensorPrimitive::Float(rank_major_to_concat::<Inner>(stacked, dim))).into_data();
            assert_eq!(vals(cat), vals(full.clone()), "gather n={n} dim={dim}");
            // Scatter side.
            let rm = Tensor::<Inner, 5>::from_primitive(TensorPrimitive::Float(split_to_rank_major::<Inner>(prim(&full), dim, n))).into_data();
            let want: Vec<f32> = parts.iter().flat_map(|p| vals(p.clone())).collect();
            assert_eq!(rm.shape.as_slice()[0], n);
            assert_eq!(vals(rm), want, "scatter n={n} dim={dim}");
        }
    }
}

/// `common::world` runs on the communicator CI asks for (`BURN_PARALLEL_TEST_COMM=nccl-emu`
/// with `--features cuda`: the NCCL communicator over the emulator; `tcp`: `TcpComm`).
#[test]
fn world_uses_the_requested_communicator() {
    let asked = std::env::var("BURN_PARALLEL_TEST_COMM");
    let emulated = cfg!(feature = "cuda") && asked.as_deref() == Ok("nccl-emu");
    let tcp = asked.as_deref() == Ok("tcp");
    let kinds = world(2, |c| Ok(format!("{c:?}")));
    for k in kinds {
        assert_eq!(k.starts_with("NcclComm("), emulated, "{k}");
        assert_eq!(k.starts_with("TcpComm("), tcp, "{k}");
    }
}
