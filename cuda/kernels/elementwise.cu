// The layer's element-wise and per-row kernels over f32 activations.

// out[t] = table row tokens[t], for a bf16 table of `cols` columns.
extern "C" __global__ void embed(const bf16_t* table, const unsigned int* tokens,
                                 float* out, int cols) {
    const bf16_t* row = table + (size_t)tokens[blockIdx.x] * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = bf16_to_f32(row[i]);
}

// One block of BLOCK threads per row: the mean square in f64, each thread
// summing a strided slice, then a tree sum.
extern "C" __global__ void rms_norm(const float* xs, const float* weight, float* out,
                                    int width, float eps) {
    __shared__ double scratch[BLOCK];
    const float* x = xs + (size_t)blockIdx.x * width;
    float* o = out + (size_t)blockIdx.x * width;
    double acc = 0.0;
    for (int i = threadIdx.x; i < width; i += BLOCK) acc += (double)(x[i] * x[i]);
    double mean_sq = block_sum_f64(acc, scratch) / (double)width;
    float inv = (float)(1.0 / sqrt(mean_sq + (double)eps));
    for (int i = threadIdx.x; i < width; i += BLOCK) o[i] = x[i] * inv * weight[i];
}

// One thread per rotated pair; `angles` holds head_dim/2 (cos, sin) pairs per row.
// `halves` pairs (x[i], x[i + d/2]), else (x[2i], x[2i+1]).
extern "C" __global__ void rope(float* xs, const float* angles, int rows, int width,
                                int head_dim, int halves) {
    int half = head_dim / 2;
    long long pairs = (long long)rows * (width / 2);
    long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) return;
    int row = (int)(p / (width / 2));
    int in_row = (int)(p % (width / 2));
    int head = in_row / half, i = in_row % half;
    float* h = xs + (size_t)row * width + (size_t)head * head_dim;
    const float* cs = angles + (size_t)row * head_dim + 2 * i;
    int a = halves ? i : 2 * i;
    int b = halves ? i + half : 2 * i + 1;
    float x = h[a], y = h[b], cos = cs[0], sin = cs[1];
    h[a] = x * cos - y * sin;
    h[b] = x * sin + y * cos;
}

extern "C" __global__ void silu_mul(float* gate, const float* up, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
}

extern "C" __global__ void gelu_tanh_mul(float* gate, const float* up, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = gate[i];
    float inner = 0.7978846f * (x + 0.044715f * x * x * x);
    gate[i] = 0.5f * x * (1.0f + tanhf(inner)) * up[i];
}

extern "C" __global__ void add(float* x, const float* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void scale(float* x, float s, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

extern "C" __global__ void add_bias(float* x, const float* bias, int width, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += bias[i % width];
}

// The GEMM's bf16 input, and the window's bf16 keys and values.
extern "C" __global__ void to_bf16(const float* x, bf16_t* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(x[i]);
}
