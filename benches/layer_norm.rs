//! Layer-norm speed: our fused CubeCL kernels vs Burn 0.21's `LayerNorm` (composed ops) in the
//! same run, forward and forward+backward, f32 (and bf16 on CUDA), with achieved GB/s.
//! `cargo bench --bench layer_norm --features cuda` on a GPU (`--features wgpu` elsewhere; on a
//! software Vulkan driver the numbers only show that it runs). PyTorch's reference:
//! `python3 benches/torch_layer_norm.py` on the same machine.

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
fn main() {
    println!("layer_norm bench: build with --features cuda (or wgpu)");
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn main() {
    bench::run();
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod bench {
    use std::time::Instant;

    use burn::backend::Autodiff;
    use burn::nn::LayerNormConfig;
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Distribution, Tensor};
    use burn_parallel::kernels::layer_norm;

    #[cfg(feature = "cuda")]
    type R = burn_cubecl::cubecl::cuda::CudaRuntime;
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    type R = burn::backend::wgpu::WgpuRuntime;
    #[cfg(feature = "cuda")]
    type BT = u8;
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    type BT = u32;
    type K = burn_cubecl::CubeBackend<R, f32, i32, BT>;

    #[cfg(feature = "cuda")]
    const SHAPES: &[[usize; 2]] = &[[8192, 768], [8192, 1024], [16384, 4096], [4096, 8192]];
    // Software Vulkan cannot allocate the large buffers: small shapes only show that it runs.
    #[cfg(not(feature = "cuda"))]
    const SHAPES: &[[usize; 2]] = &[[2048, 768], [2048, 1024], [1000, 4097]];

    fn time<F: FnMut()>(mut f: F, dev: &burn::tensor::Device<K>) -> f64 {
        for _ in 0..3 {
            f();
        }
        K::sync(dev).unwrap();
        let iters = std::env::var("LN_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        K::sync(dev).unwrap();
        start.elapsed().as_secs_f64() / iters as f64
    }

    pub fn run() {
        let dev = Default::default();
        let dtypes: &[DType] = if cfg!(feature = "cuda") { &[DType::F32, DType::BF16] } else { &[DType::F32] };
        println!("| shape | dtype | v1 fwd µs | v4 fwd µs | burn fwd µs | v4 fwd GB/s | v4 fwd+bwd µs | burn fwd+bwd µs | fwd+bwd GB/s |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for &[n, h] in SHAPES {
            for &dtype in dtypes {
                let x = Tensor::<K, 2>::random([n, h], Distribution::Normal(0.0, 1.0), &dev).cast(dtype);
                let g = Tensor::<K, 1>::ones([h], &dev).cast(dtype);
                let b = Tensor::<K, 1>::zeros([h], &dev).cast(dtype);
                let ln = LayerNormConfig::new(h).init::<K>(&dev);
                let fwd = |v| {
                    burn_parallel::kernels::set_variant(v);
                    time(|| drop(layer_norm(x.clone(), g.clone(), b.clone(), 1e-5)), &dev)
                };
                use burn_parallel::kernels::LnKernel::{Strided, Vectorized};
                let (v1, ours) = (fwd(Strided), fwd(Vectorized));
                let theirs = time(|| drop(ln.forward(x.clone())), &dev);
                type A = Autodiff<K>;
                let xa = Tensor::<A, 2>::from_inner(x.clone()).require_grad();
                let (ga, ba) = (Tensor::<A, 1>::from_inner(g.clone()).require_grad(), Tensor::<A, 1>::from_inner(b.clone()).require_grad());
                let lna = LayerNormConfig::new(h).init::<A>(&dev);
                let ours_fb = time(|| drop(layer_norm(xa.clone(), ga.clone(), ba.clone(), 1e-5).sum().backward()), &dev);
                let theirs_fb = time(|| drop(lna.forward(xa.clone()).sum().backward()), &dev);
                let bytes = (n * h * dtype.size()) as f64;
                println!(
                    "| [{n}, {h}] | {dtype:?} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.0} |",
                    v1 * 1e6,
                    ours * 1e6,
                    theirs * 1e6,
                    2.0 * bytes / ours / 1e9,
                    ours_fb * 1e6,
                    theirs_fb * 1e6,
                    7.0 * bytes / ours_fb / 1e9
                );
            }
        }
    }
}
