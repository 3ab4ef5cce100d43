"""A user's transformers-examples style script, unaware of oomguard: ``HfArgumentParser`` over
its own ``ScriptArguments`` and ``TrainingArguments``, LoRA via ``peft.get_peft_model``, a plain
``transformers.Trainer``; tokenization with the model dir's own tokenizer (chat template).

Usage:
    python hf_script.py --model_path M --data_path D.jsonl --output_dir O [TrainingArguments flags...]
    python hf_script.py args.json        # every argument in one JSON file (parser.parse_json_file)
"""

import dataclasses
import sys

from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)


@dataclasses.dataclass
class ScriptArguments:
    model_path: str = dataclasses.field(metadata={"help": "local model directory"})
    data_path: str = dataclasses.field(metadata={"help": "a .jsonl of {'messages': [...]} or {'text': ...} rows"})
    lora_r: int = dataclasses.field(default=8, metadata={"help": "LoRA rank (8 = peft's own default)"})
    lora_alpha: int = dataclasses.field(default=16, metadata={"help": "LoRA alpha"})
    max_seq_length: int = dataclasses.field(default=64, metadata={"help": "tokens per row (truncation)"})


def tokenized(tokenizer, path: str, max_len: int):
    def encode(row):
        text = row["text"] if row.get("text") else tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return tokenizer(text, truncation=True, max_length=max_len)

    data = load_dataset("json", data_files=path, split="train")
    return data.map(encode, remove_columns=data.column_names)


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        script_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        script_args, training_args = parser.parse_args_into_dataclasses()

    set_seed(training_args.seed)  # before the model: LoRA's init is random
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_path)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_path)
    model = get_peft_model(model, LoraConfig(r=script_args.lora_r, lora_alpha=script_args.lora_alpha,
                                             target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    trainer = Trainer(model=model, args=training_args,
                      train_dataset=tokenized(tokenizer, script_args.data_path, script_args.max_seq_length),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
