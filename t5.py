from h import *
P=int(sys.argv[1]) if len(sys.argv)>1 else 8601
def show(path,b,stream=False):
    s,j=post(P,path,b,stream)
    if stream:
        u=[c for c in j if isinstance(c,dict) and c.get('usage')] if s==200 else j
        print(s, b.get('truncate_prompt_tokens'), u[-1]['usage'] if s==200 and u else j)
    else:
        print(s, b.get('truncate_prompt_tokens'), j.get('usage') if s==200 else j, (j.get('prompt_token_ids') or (j['choices'][0].get('prompt_token_ids') if s==200 else None)) if s==200 else '')
    return s,j
msgs=[{'role':'user','content':'hello world this is a longer prompt'}]
for k in [1,3,5,100,-1,0,-2,16384,16385,"3",3.0,True,None]:
    show('/v1/chat/completions',{'model':'deepseek-chat','messages':msgs,'max_tokens':2,'truncate_prompt_tokens':k,'return_token_ids':True})
for k in [1,3,100,-1,0]:
    show('/v1/completions',{'model':'deepseek-chat','prompt':'hello world this is a longer prompt','max_tokens':2,'truncate_prompt_tokens':k,'return_token_ids':True})
# batch, echo
s,j=show('/v1/completions',{'model':'deepseek-chat','prompt':['hello world this is','a b c d e f g'],'max_tokens':2,'truncate_prompt_tokens':2,'echo':True,'return_token_ids':True})
print([c['text'] for c in j['choices']])
s,j=show('/v1/completions',{'model':'deepseek-chat','prompt':'hello world this is','max_tokens':0,'truncate_prompt_tokens':2,'echo':True,'logprobs':1})
print(j['choices'][0]['text'], j['choices'][0]['logprobs'])
s,j=show('/v1/completions',{'model':'deepseek-chat','prompt':[1,2,3,4,5],'max_tokens':1,'truncate_prompt_tokens':2,'echo':True,'return_token_ids':True})
print(j['choices'][0]['text'])
# FIM
s,j=show('/beta/completions',{'model':'deepseek-chat','prompt':'def f(x):','suffix':'    return y','max_tokens':2,'truncate_prompt_tokens':3,'return_token_ids':True})
# streaming
show('/v1/chat/completions',{'model':'deepseek-chat','messages':msgs,'max_tokens':2,'truncate_prompt_tokens':4,'stream':True,'stream_options':{'include_usage':True}},True)
show('/v1/completions',{'model':'deepseek-chat','prompt':'hello world this is a longer prompt','max_tokens':2,'truncate_prompt_tokens':4,'stream':True,'stream_options':{'include_usage':True}},True)
# prompt_logprobs
s,j=show('/v1/chat/completions',{'model':'deepseek-chat','messages':msgs,'max_tokens':1,'truncate_prompt_tokens':3,'prompt_logprobs':1})
print(j.get('prompt_logprobs'))
# -1 with long prompt
s,j=show('/v1/chat/completions',{'model':'deepseek-chat','messages':[{'role':'user','content':'hi '*20000}],'max_tokens':2,'truncate_prompt_tokens':-1})
s,j=show('/v1/chat/completions',{'model':'deepseek-chat','messages':[{'role':'user','content':'hi '*20000}],'max_tokens':2,'truncate_prompt_tokens':16000})
s,j=show('/v1/chat/completions',{'model':'deepseek-reasoner','messages':msgs,'max_tokens':5,'truncate_prompt_tokens':3,'return_token_ids':True})
print(j['choices'][0]['message'])
print(STATS)
