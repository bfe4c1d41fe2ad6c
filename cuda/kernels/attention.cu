// Causal attention over a window of bf16 keys and values (rows of
// n_kv_heads x head_dim), split over the keys: each block attends one split
// of one (query, head) with a blockwise online softmax, and `combine` merges
// the splits into the normalised output and its log-sum-exp.

#define MAX_HEAD_DIM 256

struct Geometry {
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int first;   // query t sees rows up to first + t
    int window;  // 0: no sliding window
    int split;   // keys per split
    int splits;
    float scale;
};

// Grid (splits, n_heads, tokens). Writes the split's running max, sum of
// exp(score - max) and un-normalised output.
extern "C" __global__ void attend_split(const float* q, const bf16_t* keys,
                                        const bf16_t* values, Geometry g,
                                        float* part_max, float* part_sum,
                                        float* part_acc) {
    __shared__ float qs[MAX_HEAD_DIM];
    __shared__ float weights[BLOCK];
    __shared__ float scratch[BLOCK];
    int s = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    int d = g.head_dim, kvh = h / (g.n_heads / g.n_kv_heads);
    int end = g.first + t + 1;
    int begin = (g.window > 0 && end > g.window) ? end - g.window : 0;
    int lo = begin + s * g.split;
    int hi = min(end, lo + g.split);
    const float* qh = q + ((size_t)t * g.n_heads + h) * d;
    for (int i = threadIdx.x; i < d; i += BLOCK) qs[i] = qh[i];
    __syncthreads();
    float m = -INFINITY, sum = 0.0f;
    float acc0 = 0.0f, acc1 = 0.0f;
    size_t row = (size_t)g.n_kv_heads * d;
    for (int c = lo; c < hi; c += BLOCK) {
        int r = c + threadIdx.x;
        float score = -INFINITY;
        if (r < hi) {
            const bf16_t* k = keys + r * row + (size_t)kvh * d;
            float dot = 0.0f;
            for (int i = 0; i < d; i++) dot += bf16_to_f32(k[i]) * qs[i];
            score = dot * g.scale;
        }
        float m_new = fmaxf(m, block_max(score, scratch));
        float p = (r < hi) ? expf(score - m_new) : 0.0f;
        float correction = (m == -INFINITY) ? 0.0f : expf(m - m_new);
        sum = sum * correction + block_sum(p, scratch);
        weights[threadIdx.x] = p;
        __syncthreads();
        int n = min(BLOCK, hi - c);
        int j0 = threadIdx.x, j1 = threadIdx.x + BLOCK;
        float a0 = 0.0f, a1 = 0.0f;
        for (int i = 0; i < n; i++) {
            const bf16_t* v = values + (size_t)(c + i) * row + (size_t)kvh * d;
            if (j0 < d) a0 += weights[i] * bf16_to_f32(v[j0]);
            if (j1 < d) a1 += weights[i] * bf16_to_f32(v[j1]);
        }
        acc0 = acc0 * correction + a0;
        acc1 = acc1 * correction + a1;
        m = m_new;
        __syncthreads();
    }
    size_t at = ((size_t)t * g.n_heads + h) * g.splits + s;
    if (threadIdx.x == 0) {
        part_max[at] = m;
        part_sum[at] = sum;
    }
    if (threadIdx.x < d) part_acc[at * d + threadIdx.x] = acc0;
    if (threadIdx.x + BLOCK < d) part_acc[at * d + threadIdx.x + BLOCK] = acc1;
}

// Grid (n_heads, tokens): merges the splits in order into `out` (normalised)
// and `lse` (-inf when no key was seen).
extern "C" __global__ void combine(const float* part_max, const float* part_sum,
                                   const float* part_acc, Geometry g, float* out,
                                   float* lse) {
    int h = blockIdx.x, t = blockIdx.y, d = g.head_dim;
    size_t pair = (size_t)t * g.n_heads + h;
    size_t at = pair * g.splits;
    float m = -INFINITY;
    for (int s = 0; s < g.splits; s++) m = fmaxf(m, part_max[at + s]);
    float total = 0.0f;
    for (int s = 0; s < g.splits; s++) {
        if (part_sum[at + s] > 0.0f) total += part_sum[at + s] * expf(part_max[at + s] - m);
    }
    float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        float o = 0.0f;
        for (int s = 0; s < g.splits; s++) {
            if (part_sum[at + s] > 0.0f) {
                o += part_acc[(at + s) * d + j] * expf(part_max[at + s] - m);
            }
        }
        out[pair * d + j] = o * inv;
    }
    if (threadIdx.x == 0) lse[pair] = total > 0.0f ? m + logf(total) : -INFINITY;
}

// Grid (pairs): merges a partial computed elsewhere (`part_out`, `part_lse`)
// into the device's (`out`, `lse`), as `merge_partials` on the host: weights
// from exp in f64, each part added only when its weight is positive.
extern "C" __global__ void merge(float* out, const float* lse, const float* part_out,
                                 const float* part_lse, int head_dim) {
    size_t pair = blockIdx.x;
    float a = lse[pair], b = part_lse[pair];
    float m = fmaxf(a, b);
    float* o = out + pair * head_dim;
    const float* p = part_out + pair * head_dim;
    if (m == -INFINITY || isnan(m)) {
        for (int j = threadIdx.x; j < head_dim; j += BLOCK) o[j] = 0.0f;
        return;
    }
    double ea = exp((double)(a - m)), eb = exp((double)(b - m));
    double total = ea + eb;
    float wa = (float)(ea / total), wb = (float)(eb / total);
    for (int j = threadIdx.x; j < head_dim; j += BLOCK) {
        float x = 0.0f;
        if (wa > 0.0f) x += wa * o[j];
        if (wb > 0.0f) x += wb * p[j];
        o[j] = x;
    }
}
