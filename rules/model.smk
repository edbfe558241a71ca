# Model stages: base model -> 4-bit QLoRA training -> adapter merge -> evaluation.


rule base_model:
    """Prepare a base model once: safetensors weights, fixed tokenizer, identity record."""
    input:
        unpack(base_model_inputs),
        code=code("base_model"),
    output:
        model=directory(f"{R}/base/{{model}}"),
    params:
        model=lambda w: config["models"][w.model],
    log:
        f"{R}/logs/base_model/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/base_model/{{model}}.tsv"
    conda:
        "../envs/model.yaml"
    script:
        "../scripts/base_model.py"
